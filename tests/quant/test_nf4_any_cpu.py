"""4-bit on the CPU behaves the same on every processor (issue 13, item 1).

bitsandbytes repacks a Linear4bit's bytes for its AVX512-BF16 kernel when ``support_avx512bf16_for_cpu``
is true (set from the CPU's features at construction) and the layer runs a no-grad eval forward.
These tests set that attribute themselves, so the repack condition is exercised on every CPU, with
or without AVX512-BF16: the repack itself is plain torch; only the kernel it then calls needs the
instruction set, and our layers must never get that far.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from velotune.quant import dequantize_nf4_state, linear4bit_state_dict, to_linear4bit  # noqa: E402
from velotune.quant.nf4_linear import NF4Linear, adopt_linear4bit, adopt_linear4bit_layers_  # noqa: E402


def _as_avx512bf16_cpu(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer act as on a CPU with AVX512-BF16; return how many."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return len(layers)


def _plain_bnb_layer(source: NF4Linear) -> nn.Module:
    """bitsandbytes' own Linear4bit holding a copy of ``source``'s NF4 weight."""
    state = copy.deepcopy(source.weight.quant_state)
    plain = bnb.nn.Linear4bit(source.in_features, source.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", device="meta")
    plain.weight = bnb.nn.Params4bit(source.weight.data.clone(), requires_grad=False, quant_state=state,
                                     blocksize=64, compress_statistics=True, quant_type="nf4", module=plain,
                                     bnb_quantized=True)
    plain.quant_state = state
    return plain


def _layer(out_features=64, in_features=128, bias=True):
    torch.manual_seed(0)
    return to_linear4bit(nn.Linear(in_features, out_features, bias=bias), compute_dtype=torch.float32)


def test_simulated_condition_makes_bitsandbytes_repack():
    """The control: the attribute alone makes bitsandbytes' own layer repack its bytes, on any CPU.

    If a bitsandbytes release changes this, the tests below no longer exercise the hazard: revisit them.
    """
    plain = _plain_bnb_layer(_layer(bias=False))
    before = plain.weight.data.clone()
    _as_avx512bf16_cpu(plain)
    plain.eval()
    with torch.no_grad():
        try:
            plain(torch.randn(3, 128))
        except Exception:  # noqa: BLE001 - the AVX512-BF16 kernel itself is missing on this CPU
            pass
    assert getattr(plain.weight.quant_state, "packing_format_for_cpu", False)
    assert plain.weight.data.shape != before.shape or not torch.equal(plain.weight.data, before)


@pytest.mark.parametrize("bias", [True, False])
def test_our_layer_never_repacks_and_computes_exactly(bias):
    layer = _layer(bias=bias)
    assert isinstance(layer, NF4Linear) and isinstance(layer, bnb.nn.Linear4bit)
    packed = layer.weight.data.clone()
    w = dequantize_nf4_state(packed, layer.weight.quant_state)  # (64, 128)
    _as_avx512bf16_cpu(layer)
    x = torch.randn(2, 5, 128)
    layer.eval()
    with torch.no_grad():
        for inp in (x, x[0, 0]):  # a matmul and a single row (bitsandbytes' gemv case)
            assert torch.equal(layer(inp), F.linear(inp, w, layer.bias))
    assert torch.equal(layer.weight.data, packed)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    layer.train()
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones(2, 5, 64) @ w)


def test_a_layer_repacked_elsewhere_is_restored_when_adopted():
    ours = _layer(bias=False)
    plain = _plain_bnb_layer(ours)
    _as_avx512bf16_cpu(plain)
    plain.eval()
    with torch.no_grad():
        try:
            plain(torch.randn(3, 128))
        except Exception:  # noqa: BLE001 - see the control test
            pass
    assert plain.weight.quant_state.packing_format_for_cpu
    adopted = adopt_linear4bit(plain)
    assert isinstance(adopted, NF4Linear) and adopted.weight is plain.weight  # no copy
    assert torch.equal(adopted.weight.data, ours.weight.data)  # the codes come back exactly
    expected = dequantize_nf4_state(ours.weight.data, ours.weight.quant_state)
    restored = dequantize_nf4_state(adopted.weight.data, adopted.weight.quant_state)
    torch.testing.assert_close(restored, expected, rtol=1e-2, atol=1e-3)  # scales keep the bf16 rounding
    tensors = linear4bit_state_dict(adopted, "proj")
    assert tensors["proj.weight"].shape == ours.weight.data.shape


def test_generic_path_layers_are_ours():
    """transformers-built Linear4bit layers (the generic loading path) are adopted, sharing their weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    proj = model.model.layers[0].self_attn.q_proj
    plain = _plain_bnb_layer(to_linear4bit(proj, compute_dtype=torch.float32))
    model.model.layers[0].self_attn.q_proj = plain
    assert adopt_linear4bit_layers_(model) == 1
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4Linear) and layer.weight is plain.weight
