"""kernels/nf4_gemv_stream.py (the NF4 GEMV streamed as 32-bit words) against the dequantize-then-matmul
reference: 1, 3 and 8 rows of x, up to three weights per launch, the gated-activation epilogue, the fused
RMSNorm prologue (Llama and Gemma offsets, a norm weight of another dtype), the residual epilogue, both
code look-ups, fp32 and double-quantized absmax, and the fallback. On the CPU through Triton's
interpreter with tiny shapes and small tiles, so each case spans several programs, K steps and (K = 192
with BLOCK_K = 128) a masked tail."""

import pytest
import torch

from velotune.kernels import nf4_gemv_stream as module
from velotune.kernels.nf4_gemv_stream import as_pairs, nf4_gemv_stream, nf4_gemv_stream_reference
from velotune.quant.linear import to_linear4bit

from .tolerances import assert_close

SMALL = {key: (16, 128, 4, 0, True) for key in module.CONFIG}  # OR-addressed look-ups, prefetch


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(module, "CONFIG", dict(SMALL))


def _nf4(K: int, n: int, device, dtype, nested: bool = True):
    return to_linear4bit(torch.nn.Linear(K, n, bias=False).to(device, dtype), compress_statistics=nested)


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, "gemv", dtype)


# (M, K, output rows of each weight, x dtype): aligned q/k/v-like; odd rows with a K tail; 8 rows, one weight
CASES = [(1, 128, (64, 32, 32), torch.bfloat16), (3, 192, (37, 5), torch.float16), (8, 64, (24,), torch.float32)]
IDS = ["m1-qkv-bf16", "m3-odd-tail-fp16", "m8-one-fp32"]


@pytest.mark.parametrize("M, K, ns, dtype", CASES, ids=IDS)
def test_stream_gemv_and_glu(M, K, ns, dtype, device):
    torch.manual_seed(0)
    layers = [_nf4(K, n, device, dtype) for n in ns]
    weights = [layer.weight for layer in layers]
    x = torch.randn(M, K, device=device, dtype=dtype)
    for got, want in zip(nf4_gemv_stream(x, weights, use_triton=True), nf4_gemv_stream_reference(x, weights)):
        _close(got, want, dtype)
    if len(ns) >= 2:
        up = _nf4(K, ns[0], device, dtype)
        got, = nf4_gemv_stream(x, [layers[0], up], "silu", use_triton=True)  # modules work as well as weights
        want, = nf4_gemv_stream_reference(x, [layers[0].weight, up.weight], "silu")
        _close(got, want, dtype)


@pytest.mark.parametrize("offset, norm_dtype", [(0.0, torch.bfloat16), (1.0, torch.float32)],
                         ids=["llama-norm", "gemma-norm-fp32-weight"])
def test_stream_norm_prologue_and_residual(offset, norm_dtype, device):
    """norm=(w, eps, offset): the projections read RMSNorm(x) (q/k/v and gate/up + GLU); residual: r + x W^T."""
    M, K, dtype = 1, 192, torch.bfloat16
    torch.manual_seed(1)
    x = torch.randn(M, K, device=device, dtype=dtype) * 3
    norm = ((torch.randn(K, device=device) * 0.1).to(norm_dtype), 1e-6, offset)
    gate, up = _nf4(K, 40, device, dtype), _nf4(K, 40, device, dtype)
    got, = nf4_gemv_stream(x, [gate, up], "gelu_pytorch_tanh", norm=norm, use_triton=True)
    want, = nf4_gemv_stream_reference(x, [gate.weight, up.weight], "gelu_pytorch_tanh", norm=norm)
    _close(got, want, dtype)
    residual = torch.randn(M, 40, device=device, dtype=dtype)
    got, = nf4_gemv_stream(x, [gate.weight], residual=residual, use_triton=True)
    want, = nf4_gemv_stream_reference(x, [gate.weight], residual=residual)
    _close(got, want, dtype)


@pytest.mark.parametrize("lookup, prefetch, nested", [(1, True, True), (2, False, True), (0, False, False)],
                         ids=["pair-table", "pointer-plus-nibble-no-prefetch", "fp32-absmax-no-prefetch"])
def test_stream_lookup_and_absmax_variants(lookup, prefetch, nested, device, monkeypatch):
    """The other code look-ups (LOOKUP = 1: the 256-entry pair table; 2: pointer + nibble), loads issued
    in their own K step (no prefetch), and weights quantized without double quantization; K = 320 is
    not a multiple of BLOCK_K (the last step masked)."""
    monkeypatch.setitem(module.CONFIG, "dense", (16, 128, 4, lookup, prefetch))
    layer = _nf4(320, 24, device, torch.float32, nested)
    x = torch.randn(1, 320, device=device)
    got, = nf4_gemv_stream(x, [layer.weight], use_triton=True)
    want, = nf4_gemv_stream_reference(x, [layer.weight])
    _close(got, want, torch.float32)


def test_stream_falls_back_where_the_kernel_cannot_run(device):
    """K not a multiple of the quantization block: the reference runs, and use_triton=True says why not."""
    layer = _nf4(96, 8, device, torch.float32)  # 96 % 64 != 0
    x = torch.randn(2, 96, device=device)
    got, = nf4_gemv_stream(x, [layer.weight])
    assert torch.equal(got, nf4_gemv_stream_reference(x, [layer.weight])[0])
    with pytest.raises(ValueError, match="quantization block"):
        nf4_gemv_stream(x, [layer.weight], use_triton=True)


def test_as_pairs_puts_columns_2j_and_2j_plus_1_in_word_j():
    """The view the kernel reads x through: low half = element 2j, high half = element 2j + 1."""
    x = torch.tensor([[1.0, -2.0, 3.5, 0.25]], dtype=torch.bfloat16)
    words = as_pairs(x)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    low = (words << 16).view(torch.float32)
    high = (words & -65536).view(torch.float32)
    assert low.tolist() == [[1.0, 3.5]] and high.tolist() == [[-2.0, 0.25]]
    offset = torch.randn(9, dtype=torch.float32)[1:]  # storage offset 1: copied, not misread
    assert torch.equal(as_pairs(offset).view(torch.float32), offset)


def test_code_table_is_aligned_for_the_or_addressing():
    """LOOKUP 0 ORs 4 x nibble into the table's address: a table off a 64-byte boundary gets an aligned copy."""
    room = torch.randn(40)
    codes = room[1:17]  # 4 bytes past an aligned allocation
    assert codes.data_ptr() % 64 != 0
    aligned = module._aligned(codes)
    assert aligned.data_ptr() % 64 == 0 and torch.equal(aligned, codes)
    assert module._aligned(codes) is aligned  # prepared once per table
