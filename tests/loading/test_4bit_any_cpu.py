"""A 4-bit model that generated on a CPU with AVX512-BF16 still trains and exports exactly (issue 13, item 1).

The CPU feature is simulated by setting bitsandbytes' own per-layer flag (see
tests/quant/test_nf4_any_cpu.py, whose control test shows the flag alone makes bitsandbytes repack),
so this runs the reported failure on every processor.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from velotune import FastLanguageModel  # noqa: E402

from tiny.folders import write_tiny_llama  # noqa: E402


def _as_avx512bf16_cpu(model) -> int:
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return len(layers)


def _tiny_4bit_model(folder):
    if not (folder / "config.json").exists():
        write_tiny_llama(folder, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), device_map="cpu", load_in_4bit=True,
                                                         max_seq_length=64)
    return model, tokenizer


def _lora_grads(model, tokenizer):
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                            use_gradient_checkpointing=False)
    peft.train()
    batch = tokenizer(["hello there, general", "a b c d e f g h"], return_tensors="pt", padding=True)
    out = peft(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return peft, {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}


def test_training_after_generate_is_unchanged_on_an_avx512bf16_cpu(tmp_path):
    """The reported failure: generate (no-grad eval) on such a CPU, then train: same gradients, then export."""
    folder = tmp_path / "tiny"
    fresh, tokenizer = _tiny_4bit_model(folder)
    _, expected = _lora_grads(fresh, tokenizer)

    model, tokenizer = _tiny_4bit_model(folder)
    assert _as_avx512bf16_cpu(model) == 14  # 7 projections x 2 layers; lm_head stays 16-bit
    model.eval()
    with torch.no_grad():
        model.generate(**tokenizer(["hello"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    peft, got = _lora_grads(model, tokenizer)
    assert got.keys() == expected.keys() and len(got) == 28
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert all(g.abs().sum() > 0 for name, g in got.items() if "lora_B" in name)  # lora_A's are 0 at step 0
    peft.eval()
    with torch.no_grad():  # merging reads the NF4 bytes: they must still be in bitsandbytes' layout
        peft.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    assert any((tmp_path / "merged").glob("*.safetensors"))


