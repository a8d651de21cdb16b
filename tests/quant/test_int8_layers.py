"""8-bit layers (issue 18 item 5) on the CPU, where bitsandbytes 0.50 runs LLM.int8 too: the weights read back
equal bitsandbytes' own dequantization before and after the first forward (which moves the row scales), and a
LoRA model over int8 layers trains and exports merged weights that behave like it (the GPU run: test_int8_gpu.py)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from velotune.quant.int8 import dequantize_int8_weight, is_linear8bit, quantize_model_int8_  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def tiny_int8(tiny_llama_dir):
    from velotune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    names = quantize_model_int8_(model)
    return model, tokenizer, original, names


def test_int8_weights_read_back_as_bitsandbytes_dequantizes(tiny_int8):
    from bitsandbytes.functional import int8_vectorwise_dequant

    model, _, original, names = tiny_int8
    assert names == [n for n in original if n != "lm_head"] and not is_linear8bit(model.lm_head)
    layer = model.model.layers[0].mlp.down_proj
    assert is_linear8bit(layer) and layer.weight.dtype == torch.int8
    before = dequantize_int8_weight(layer)
    assert torch.equal(before, int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB))
    step = original["model.layers.0.mlp.down_proj"].abs().amax(dim=1, keepdim=True) / 127  # one code per row
    assert ((before - original["model.layers.0.mlp.down_proj"]).abs() <= step).all()  # within one code
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
    assert layer.weight.SCB is None and layer.state.SCB is not None  # where the first forward left the scales
    assert torch.equal(dequantize_int8_weight(layer), before)


def test_lora_over_int8_trains_and_merges(tiny_int8, tmp_path):
    from velotune import FastLanguageModel
    from velotune.export import save_pretrained_merged

    model, tokenizer, _, _ = tiny_int8
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=0,
                                             use_gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 90, (4, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True), losses
    # the exporter's check loads the folder in velotune and transformers and compares with the int8 model
    folder = save_pretrained_merged(model, tmp_path / "merged", tokenizer, save_method="merged_16bit")
    from safetensors.torch import load_file

    merged = load_file(folder / "model.safetensors")
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    expected = dequantize_int8_weight(layer.base_layer) + layer.get_delta_weight("default").float()
    torch.testing.assert_close(merged["model.layers.1.self_attn.v_proj.weight"].float(), expected)
