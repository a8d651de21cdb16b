"""lora/peft_model.py: get_peft_model makes real PEFT adapters from the Unsloth API's arguments, interchangeable with transformers'."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM
from transformers import LlamaForCausalLM

from velotune import FastLanguageModel, VelotunePeftModel

from tiny.folders import write_tiny_llama

IDS = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 5, 9, 33], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


@pytest.fixture()
def tiny(tmp_path):
    write_tiny_llama(tmp_path / "base")
    return tmp_path / "base"


def _load(folder):
    return FastLanguageModel.from_pretrained(str(folder), device_map="cpu", load_in_4bit=False)


def _perturb_adapters(model, seed=1):
    """LoRA B starts at zero; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_returns_peft_model_with_trainable_adapters_only(tiny):
    model, _ = _load(tiny)
    peft_model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    assert isinstance(peft_model, VelotunePeftModel) and isinstance(peft_model, PeftModelForCausalLM)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("q_proj.lora_A" in n for n in trainable) == 2  # every layer
    assert peft_model.peft_config["default"].lora_alpha == 16


@pytest.mark.parametrize("r", [1, 7, 64, 256])
def test_any_rank_trains(tiny, r):
    model, _ = _load(tiny)
    peft_model = FastLanguageModel.get_peft_model(model, r=r, use_gradient_checkpointing=False)
    peft_model.train()
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kwargs, parameter", [
    ({"r": 0}, "r="), ({"r": -4}, "r="), ({"r": 2.5}, "r="),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"bias": "some"}, "bias"),
    ({"target_modules": ["q_proj", "qkv"]}, "target_modules"),
    ({"use_gradient_checkpointing": "yes"}, "use_gradient_checkpointing"),
])
def test_bad_arguments_name_parameter_and_allowed_values(tiny, kwargs, parameter):
    model, _ = _load(tiny)
    with pytest.raises(ValueError) as info:
        FastLanguageModel.get_peft_model(model, **kwargs)
    message = str(info.value)
    assert parameter in message
    if parameter == "bias":
        assert "'none', 'all', 'lora_only'" in message
    if parameter == "target_modules":
        assert "'qkv'" in message and "gate_proj" in message


def test_random_state_makes_adapters_reproducible(tiny):
    a = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4, random_state=7)
    b = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4, random_state=7)
    c = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4, random_state=8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    sa, sb, sc = (dict(m.named_parameters())[key] for m in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)


def test_embeddings_and_lm_head_train_fully(tiny):
    """The seed's continued-pretraining page lists embed_tokens and lm_head in target_modules."""
    model, _ = _load(tiny)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
               "lm_head"]
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_rslora_scaling(tiny):
    peft_model = FastLanguageModel.get_peft_model(_load(tiny)[0], r=16, lora_alpha=16, use_rslora=True)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 16 ** 0.5)


def test_dropout_and_bias_paths_run(tiny):
    peft_model = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4, lora_dropout=0.1, bias="lora_only")
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()


def test_gradient_checkpointing_gives_same_gradients(tiny):
    grads = []
    for mode in (False, True, "unsloth"):
        model = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4, use_gradient_checkpointing=mode)
        _perturb_adapters(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-5, atol=1e-7)


def test_adapters_interchange_with_transformers_and_peft(tiny, tmp_path):
    """Our adapter folder loads onto transformers' Llama with PEFT and gives our logits; and back."""
    ours = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4)
    _perturb_adapters(ours)
    ours.eval()
    ours.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny).eval(), tmp_path / "adapter")
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back, _ = FastLanguageModel.from_pretrained(str(tmp_path / "theirs"), device_map="cpu", load_in_4bit=False)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_folder_reloads_trainable(tiny, tmp_path):
    model, tokenizer = _load(tiny)
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    _perturb_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "lora_model")
    tokenizer.save_pretrained(tmp_path / "lora_model")
    reloaded, reloaded_tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), device_map="cpu", load_in_4bit=False)
    assert isinstance(reloaded, VelotunePeftModel)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)
    assert reloaded_tokenizer.pad_token == tokenizer.pad_token
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)


def test_second_get_peft_model_is_refused(tiny):
    peft_model = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        FastLanguageModel.get_peft_model(peft_model, r=4)


def test_for_inference_and_for_training(tiny):
    peft_model = FastLanguageModel.get_peft_model(_load(tiny)[0], r=4)
    FastLanguageModel.for_inference(peft_model)
    assert not peft_model.training and peft_model.get_base_model().config.use_cache
    out = peft_model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)
    FastLanguageModel.for_training(peft_model)
    assert peft_model.training and not peft_model.get_base_model().config.use_cache
