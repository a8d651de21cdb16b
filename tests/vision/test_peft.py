"""FastVisionModel.get_peft_model: the four switches pick exactly the expected layers of each family."""

from __future__ import annotations

import logging

import pytest
import torch

from velotune import FastVisionModel
from velotune.vision.peft import fold, select_layers

from tiny import vision as tiny

# Per family: the tiny model's linear layers by (tower, kind), written out by hand from transformers'
# module tree (two text layers; Mllama's second one cross-attends; two vision layers, Mllama one global).
TEXT_ATTN = [f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
TEXT_MLP = [f"model.language_model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")]
EXPECTED = {
    "qwen2_vl": dict(
        vision_attn=[f"model.visual.blocks.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")],
        vision_mlp=[f"model.visual.blocks.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]
        + ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"],
        text_attn=TEXT_ATTN, text_mlp=TEXT_MLP),
    "qwen2_5_vl": dict(
        vision_attn=[f"model.visual.blocks.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")],
        vision_mlp=[f"model.visual.blocks.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")]
        + ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"],
        text_attn=TEXT_ATTN, text_mlp=TEXT_MLP),
    "mllama": dict(
        vision_attn=[f"model.vision_model.{t}.layers.{i}.self_attn.{p}_proj"
                     for t, n in (("transformer", 2), ("global_transformer", 1)) for i in range(n) for p in "qkvo"],
        vision_mlp=[f"model.vision_model.{t}.layers.{i}.mlp.fc{j}"
                    for t, n in (("transformer", 2), ("global_transformer", 1)) for i in range(n) for j in (1, 2)]
        + ["model.multi_modal_projector"],
        text_attn=[f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
        + [f"model.language_model.layers.1.cross_attn.{p}_proj" for p in "qkvo"],
        text_mlp=TEXT_MLP),
    "llava": dict(
        vision_attn=[f"model.vision_tower.encoder.layers.{i}.self_attn.{p}_proj"
                     for i in (0, 1) for p in ("q", "k", "v", "out")],
        vision_mlp=[f"model.vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]
        + ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"],
        text_attn=TEXT_ATTN, text_mlp=TEXT_MLP),
    "gemma3": dict(
        vision_attn=[f"model.vision_tower.encoder.layers.{i}.self_attn.{p}_proj"
                     for i in (0, 1) for p in ("q", "k", "v", "out")],
        vision_mlp=[f"model.vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)],
        text_attn=TEXT_ATTN, text_mlp=TEXT_MLP),
}
SWITCHES = [(v, t, a, m) for v in (True, False) for t in (True, False) for a in (True, False) for m in (True, False)]


@pytest.fixture(scope="module")
def models():
    return {family: tiny.build(family)[0] for family in tiny.FAMILIES}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_switch_combination_selects_exactly_its_groups(family, models):
    model, groups = models[family], EXPECTED[family]
    for vision, text, attn, mlp in SWITCHES:
        expected = set()
        for tower_on, tower in ((vision, "vision"), (text, "text")):
            for kind_on, kind in ((attn, "attn"), (mlp, "mlp")):
                if tower_on and kind_on:
                    expected |= set(groups[f"{tower}_{kind}"])
        chosen = select_layers(model, vision, text, attn, mlp)
        assert set(chosen) == expected, (family, vision, text, attn, mlp)
    every = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert every - set(select_layers(model)) == {"lm_head"}  # the four on: every linear layer but lm_head


def test_pixtral_layout(models):
    """Pixtral (Llava with a Pixtral tower; its processor needs torchvision, so only the model is built here)."""
    import transformers as T

    config = T.LlavaConfig(
        text_config=dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, head_dim=16), image_token_id=10)
    model = T.LlavaForConditionalGeneration(config)
    assert set(select_layers(model, True, False, True, False)) == {
        f"model.vision_tower.transformer.layers.0.attention.{p}_proj" for p in "qkvo"}
    assert set(select_layers(model, True, False, False, True)) == {
        *(f"model.vision_tower.transformer.layers.0.feed_forward.{p}_proj" for p in ("gate", "up", "down")),
        "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}


def test_get_peft_model_trains_the_chosen_layers_and_logs_them(vision_folder, caplog):
    model, _ = FastVisionModel.from_pretrained(str(vision_folder("qwen2_vl")), load_in_4bit=True, device_map="cpu")
    with caplog.at_level(logging.INFO, logger="velotune"):
        model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                               finetune_attention_modules=True, finetune_mlp_modules=False, r=4,
                                               lora_alpha=8)
    assert "LoRA on 8 layers: model.language_model.layers.{0,1}.self_attn.q_proj" in caplog.text
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in model.named_modules() if n.endswith("lora_A.default")}
    assert wrapped == {f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert type(model).__name__ == "VisionPeftModel"


def test_a_choice_of_nothing_is_an_error(vision_folder):
    model, _ = FastVisionModel.from_pretrained(str(vision_folder("gemma3")), load_in_4bit=False, device_map="cpu")
    with pytest.raises(ValueError, match="selects no layer.*finetune_vision_layers / finetune_language_layers AND"):
        FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=False)
    with pytest.raises(ValueError, match="selects no layer"):
        FastVisionModel.get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(ValueError, match="finetune_mlp_modules='yes'"):
        FastVisionModel.get_peft_model(model, finetune_mlp_modules="yes")


def test_fold():
    names = [f"a.layers.{i}.q" for i in range(3)] + ["a.merger.mlp.0", "a.merger.mlp.2", "lm_head"]
    assert fold(names) == ["a.layers.{0-2}.q", "a.merger.mlp.{0,2}", "lm_head"]


def test_a_saved_adapter_loads_back_trainable(vision_folder, tmp_path):
    """The notebooks' `FastVisionModel.from_pretrained("lora_model")`: base + the saved adapter, trainable."""
    from .test_collator import _rows
    from velotune import UnslothVisionDataCollator

    model, processor = FastVisionModel.from_pretrained(str(vision_folder("llava")), load_in_4bit=False,
                                                       device_map="cpu")
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a non-zero adapter, as after training
    model.save_pretrained(tmp_path / "lora_model")
    processor.save_pretrained(tmp_path / "lora_model")
    loaded, loaded_processor = FastVisionModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=False,
                                                               device_map="cpu")
    assert type(loaded).__name__ == "VisionPeftModel" and type(loaded_processor) is type(processor)
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
