"""NF4 dequantization kernel: bit for bit against bitsandbytes' dequantize_4bit (its CPU path
runs here; on the GPU machine its CUDA path) and against our quant/nf4.py."""

import pytest
import torch

from velotune.kernels import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_weight
from velotune.quant import dequantize_nf4 as quant_dequantize_nf4
from velotune.quant import quantize_nf4
from velotune.quant.linear import to_linear4bit

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

# aligned with several nested absmax blocks (320 blocks of 64 > 256); odd: partial block, odd count
SHAPES = [(128, 160), (37, 77)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kwargs(state, dtype=None):
    kwargs = dict(blocksize=state.blocksize, shape=state.shape, dtype=dtype or state.dtype)
    if state.nested:
        kwargs.update(
            nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code, offset=state.offset,
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    return kwargs


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_bit_exact_vs_bitsandbytes(shape, dtype, double_quant, device):
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    want = bnbF.dequantize_4bit(packed, state)
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want)
    reference = dequantize_nf4_reference(packed, state.absmax, state.code, **_kwargs(state))
    assert torch.equal(reference, want)


@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_bit_exact_vs_our_quantizer_and_weight_helper(shape, device):
    w = torch.randn(shape, device=device, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, compress_statistics=True)
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert torch.equal(got, quant_dequantize_nf4(packed, state))
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    module = to_linear4bit(linear)
    want = quant_dequantize_nf4(module.weight.data, module.weight.quant_state)
    assert torch.equal(dequantize_nf4_weight(module, use_triton=True), want)
    assert torch.equal(dequantize_nf4_weight(module.weight, use_triton=True), want)


def test_other_output_dtype_and_quant_storage(device):
    """Storage other than uint8 (bytes reinterpreted) and a compute dtype other than the original."""
    w = torch.randn(48, 64, device=device)
    packed, state = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
    )
    want = bnbF.dequantize_4bit(packed, state).to(torch.bfloat16)  # fp32 product, one rounding
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state, torch.bfloat16), use_triton=True)
    assert torch.equal(got, want)


def test_bad_inputs_are_named():
    w = torch.randn(8, 64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    with pytest.raises(ValueError, match="need 4 absmax entries, got 8"):
        dequantize_nf4(packed, state.absmax, state.code, **{**_kwargs(state), "blocksize": 128})
    with pytest.raises(ValueError, match="needs nested_absmax, nested_quant_map and offset together"):
        dequantize_nf4(
            packed, state.absmax, state.code, nested_absmax=state.state2.absmax, shape=(8, 64), dtype=torch.float32
        )
    with pytest.raises(ValueError, match="carries no bitsandbytes quant_state"):
        dequantize_nf4_weight(torch.nn.Linear(4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
def test_real_size_gpu(double_quant):
    w = (torch.randn(14336, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert torch.equal(got, bnbF.dequantize_4bit(packed, state))
