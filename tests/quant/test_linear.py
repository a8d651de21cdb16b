"""to_linear4bit / quantize_model_: bitsandbytes' Linear4bit running our quantization."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from velotune.quant import (  # noqa: E402
    dequantize_nf4_state, nf4_available, quantize_model_, quantize_nf4, to_linear4bit)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear4bit_forward_equals_dequantized_linear(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33, bias=bias).to(dtype)
    layer = to_linear4bit(linear, compute_dtype=dtype)
    assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
    assert layer.weight.bnb_quantized and layer.weight.quant_state is layer.quant_state
    assert layer.weight.device == linear.weight.device and layer.weight.requires_grad is False
    assert layer.bias is linear.bias
    packed, state = quantize_nf4(linear.weight.detach())
    assert torch.equal(layer.weight.data, packed)
    w = dequantize_nf4_state(layer.weight.data, layer.weight.quant_state)  # (33, 70)
    x = torch.randn(2, 5, 70, dtype=dtype, requires_grad=True)
    layer.train()
    y = layer(x)
    assert torch.equal(y, F.linear(x, w, linear.bias))
    y.sum().backward()  # gradient flows to the input through the frozen 4-bit weight
    assert torch.equal(x.grad, torch.ones(2, 5, 33, dtype=dtype) @ w)
    layer.eval()
    with torch.no_grad():
        for inp in (x.detach(), x.detach()[0, 0]):  # matmul and the single-row gemv path
            # exact on every CPU: our layer never takes bitsandbytes' AVX512-BF16 repacked path
            assert torch.equal(layer(inp), F.linear(inp, w, linear.bias))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_quantize_model_replaces_all_but_skipped_and_frees_weights():
    model = _tiny_llama()
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    old_q = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    skip = ("lm_head", "layers.1.mlp")
    names = quantize_model_(model, skip_modules=skip, compute_dtype=torch.float32)
    gc.collect()
    assert old_q() is None  # the fp weight is gone
    expected = [n for n in reference if n != "lm_head" and not n.startswith("model.layers.1.mlp.")]
    assert names == expected and len(names) == 7 + 4
    for name, weight in reference.items():
        module = model.get_submodule(name)
        if name in names:
            assert isinstance(module, bnb.nn.Linear4bit)
            packed, _ = quantize_nf4(weight)
            assert torch.equal(module.weight.data, packed)
        else:
            assert type(module) is nn.Linear and torch.equal(module.weight, weight)
    assert quantize_model_(model, skip_modules=skip) == []  # idempotent: Linear4bit is never re-quantized
    ids = torch.tensor([[1, 5, 9, 3]])
    model.train()
    out = model(ids, labels=ids)  # the whole 4-bit model runs forward and backward on CPU
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_skip_pattern_matches_whole_components():
    from velotune.quant.linear import _skipped

    assert _skipped("lm_head", ["lm_head"])
    assert _skipped("model.vision_tower.blocks.0.fc1", ["vision_tower"])
    assert _skipped("model.layers.3.mlp.gate", ["mlp.gate"])
    assert not _skipped("model.layers.3.mlp.gate_proj", ["mlp.gate"])
    assert not _skipped("model.layers.3.mlp.gate_proj", ["lm_head"])


def test_nf4_available():
    ok, why = nf4_available("cpu")
    assert ok, why  # bitsandbytes >= 0.45 runs 4-bit on the CPU
    ok, why = nf4_available("meta")
    assert not ok and "meta" in why
    if not torch.cuda.is_available():
        ok, why = nf4_available("cuda")
        assert not ok and "CUDA" in why
