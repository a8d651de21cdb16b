"""quantize_nf4 / dequantize_nf4_state against bitsandbytes itself (its CPU paths run here)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

from velotune.quant import NF4_CODE, dequantize_nf4_state, quantize_nf4
from velotune.quant.blockwise8 import dynamic_map, quantize_blockwise_8bit
from tiny.bnb_reference import bnb_dequantize_4bit  # noqa: E402



def bnb_quantize(w, compress_statistics, quant_storage=torch.uint8):
    return bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4", quant_storage=quant_storage
    )


SHAPES = [(64, 64), (33, 70), (7,), (3, 5), (1, 1), (96, 352), (257, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_same_state(ours, theirs):
    assert torch.equal(ours.absmax, theirs.absmax)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert torch.equal(ours.code, theirs.code)
    assert ours.nested == theirs.nested
    if theirs.nested:
        assert torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax)
        assert torch.equal(ours.state2.code, theirs.state2.code)
        assert ours.state2.blocksize == theirs.state2.blocksize == 256
        assert ours.state2.dtype == theirs.state2.dtype


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bit_exact_vs_bitsandbytes(shape, dtype, compress_statistics):
    torch.manual_seed(hash((shape, str(dtype))) % 1000)
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(w, compress_statistics=compress_statistics)
    ref_packed, ref_state = bnb_quantize(w, compress_statistics)
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    _assert_same_state(state, ref_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (33, 70), (3, 5), (96, 352)])
def test_dequantize_bit_exact_vs_bitsandbytes(shape, dtype):
    torch.manual_seed(1)
    w = torch.randn(shape).to(dtype)
    for compress_statistics in (True, False):
        ref_packed, ref_state = bnb_quantize(w, compress_statistics)
        ref = bnb_dequantize_4bit(ref_packed, ref_state)
        ours = dequantize_nf4_state(ref_packed, ref_state)
        assert ours.dtype == ref.dtype == dtype and ours.shape == w.shape
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage(storage):
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, compress_statistics=True, quant_storage=storage)
    ref_packed, ref_state = bnb_quantize(w, True, quant_storage=storage)
    assert packed.dtype == storage and packed.shape == ref_packed.shape
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert torch.equal(dequantize_nf4_state(packed, state), bnb_dequantize_4bit(ref_packed, ref_state))


def test_zero_blocks_and_extremes():
    w = torch.randn(6, 128)
    w[1] = 0.0  # two all-zero blocks
    w[2, :64] = torch.linspace(-1, 1, 64)  # values exactly at +-absmax
    w[3, :64] = NF4_CODE.repeat(4)  # values exactly on codes
    w[4, :63] = (NF4_CODE[:-1] + NF4_CODE[1:]).repeat(5)[:63] / 2  # exactly on thresholds
    w[4, 63] = 1.0
    for cs in (True, False):
        packed, state = quantize_nf4(w, compress_statistics=cs)
        ref_packed, ref_state = bnb_quantize(w, cs)
        assert torch.equal(packed, ref_packed)
        _assert_same_state(state, ref_state)
        assert torch.equal(dequantize_nf4_state(packed, state)[1], torch.zeros(128))


def test_layout_high_nibble_first_and_thresholds():
    # one block: absmax 1, values chosen to hit known codes; the threshold itself takes the lower code
    w = torch.tensor([1.0, -1.0, 0.0, 0.07958029955625534, 0.03979014977812767, 0.0398, 0.5, -0.5])
    packed, state = quantize_nf4(w, compress_statistics=False)
    codes = [int(b) >> s & 0xF for b in packed.view(-1) for s in (4, 0)]
    assert codes == [15, 0, 7, 8, 7, 8, 12, 2]
    assert packed.shape == (4, 1) and torch.equal(state.absmax, torch.tensor([1.0]))


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


def test_nested_rounding_modes():
    """'cpu-lut' equals bitsandbytes' CPU kernel; 'nearest' (the CUDA rule) is the true nearest code."""
    torch.manual_seed(0)
    code = dynamic_map()
    x = torch.cat([torch.randn(3000) * 0.3, torch.randn(2000) * 1e-3])
    ref_q, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise.default(x, code, 256)
    q, absmax = quantize_blockwise_8bit(x, code, 256, "cpu-lut")
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    q_near, _ = quantize_blockwise_8bit(x, code, 256, "nearest")
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % 256)).view(-1, 256)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)[: x.numel()]
    err_near = (code[q_near.long()] - scaled).abs()
    best = (code.unsqueeze(0) - scaled.unsqueeze(1)).abs().min(dim=1).values
    assert torch.equal(err_near, best)


def test_cuda_semantics_on_cpu():
    """backend='cuda' reproduces the CUDA kernel: zero blocks -> code 0, nested rounding = nearest."""
    w = torch.randn(4, 64)
    w[0] = 0
    packed, state = quantize_nf4(w, compress_statistics=False, backend="cuda")
    assert torch.equal(packed[:32], torch.zeros(32, 1, dtype=torch.uint8))  # code 0 = -1.0 ...
    assert torch.equal(dequantize_nf4_state(packed, state)[0], torch.zeros(64))  # ... times absmax 0
    packed, state = quantize_nf4(w, compress_statistics=True, backend="cuda")
    assert torch.equal(packed[:32], torch.zeros(32, 1, dtype=torch.uint8))
    cpu_packed, _ = quantize_nf4(w, compress_statistics=True, backend="cpu")
    assert torch.equal(packed[32:], cpu_packed[32:])


def test_reconstruction_error_is_nf4_sized():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    packed, state = quantize_nf4(w, compress_statistics=False)
    err = (dequantize_nf4_state(packed, state) - w).abs()
    # half the widest NF4 gap (-1 .. -0.6961928) times the block absmax bounds the error
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    assert (err.view(-1, 64) <= half_gap * absmax * (1 + 1e-6)).all()
    assert packed.numel() == w.numel() // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (33, 70), (3, 5), (512, 1024)])
def test_bit_exact_vs_bitsandbytes_cuda(shape, dtype):
    w = torch.randn(shape, device="cuda").to(dtype)
    for cs in (True, False):
        packed, state = quantize_nf4(w, compress_statistics=cs)
        ref_packed, ref_state = bnb_quantize(w, cs)
        assert torch.equal(packed, ref_packed)
        _assert_same_state(state, ref_state)
        assert torch.equal(dequantize_nf4_state(packed, state), bnb_dequantize_4bit(ref_packed, ref_state))
