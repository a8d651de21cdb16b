"""Small-batch GEMV kernels (kernels/gemv.py dense, kernels/nf4_gemv.py NF4) against their
references: one to three weights per launch and the gated-activation epilogue, M = 1 and M > 1,
aligned and odd sizes. On the CPU through Triton's interpreter (tiny shapes)."""

import pytest
import torch

from velotune.kernels import gemv as dense_module
from velotune.kernels import nf4_gemv as nf4_module
from velotune.kernels.gemv import gemv, gemv_reference
from velotune.kernels.nf4_gemv import nf4_gemv, nf4_gemv_reference
from velotune.quant.linear import to_linear4bit

from .tolerances import assert_close

# (M, K, output rows of each weight): aligned; odd rows, K not a multiple of the tile; 8 rows, one weight
SHAPES = [(1, 128, (64, 32, 32)), (3, 192, (37, 5)), (8, 64, (24,))]
IDS = ["m1-aligned", "m3-odd", "m8-one"]
# Small tiles so the test shapes span several programs and K steps (and a tail: K=192 with BK=128).
SMALL = {"dense": (16, 128, 4, False), "glu": (16, 128, 4, False)}
SMALL_NF4 = {"dense": (16, 128, 4, True), "glu": (16, 128, 4, True)}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(dense_module, "CONFIG", dict(SMALL))
    monkeypatch.setattr(nf4_module, "CONFIG", dict(SMALL_NF4))


def _close(got, want, dtype, op):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, op, dtype)


# The tl.dot variant on one shape (fp32 here: Triton's interpreter computes bf16 tl.dot wrongly, numpy
# having no bf16; on the GPU machine bf16 runs too).
DOT_CASES = [(False, torch.float32)] + [(False, torch.bfloat16)] + [(True, torch.float32), (True, torch.bfloat16)]


@pytest.mark.parametrize("dot, dtype", DOT_CASES, ids=["sum-fp32", "sum-bf16", "dot-fp32", "dot-bf16"])
@pytest.mark.parametrize("M, K, ns", SHAPES, ids=IDS)
def test_dense_gemv(M, K, ns, dtype, dot, device, monkeypatch):
    if dot and (dtype is torch.bfloat16 and device.type == "cpu" or M != 3 and device.type == "cpu"):
        pytest.skip("the dot variant runs on one shape in fp32 on the CPU (interpreter: no bf16 tl.dot)")
    monkeypatch.setitem(dense_module.CONFIG, "dense", (16, 128, 4, dot))
    monkeypatch.setitem(dense_module.CONFIG, "glu", (16, 128, 4, dot))
    x = torch.randn(M, K, device=device, dtype=dtype)
    weights = [(torch.randn(n, K, device=device) * K ** -0.5).to(dtype) for n in ns]
    for got, want in zip(gemv(x, weights, use_triton=True), gemv_reference(x, weights)):
        _close(got, want, dtype, "gemv")
    if len(ns) >= 2:
        pair = [weights[0], (torch.randn_like(weights[0], dtype=torch.float32) * K ** -0.5).to(dtype)]
        for activation in ("silu", "gelu_pytorch_tanh", "gelu"):
            got, = gemv(x, pair, activation, use_triton=True)
            want, = gemv_reference(x, pair, activation)
            _close(got, want, dtype, "gemv.glu")


# Double quantization (the QLoRA default) on every shape; fp32 absmax on one.
NF4_CASES = [(shape, dtype, True) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)]
NF4_CASES += [(SHAPES[1], torch.bfloat16, False)]
NF4_IDS = [f"{IDS[SHAPES.index(s)]}-{str(d)[6:]}-{'dq' if n else 'fp32-absmax'}" for s, d, n in NF4_CASES]


@pytest.mark.parametrize("shape, dtype, nested", NF4_CASES, ids=NF4_IDS)
def test_nf4_gemv(shape, dtype, nested, device):
    M, K, ns = shape
    torch.manual_seed(0)
    layers = [to_linear4bit(torch.nn.Linear(K, n, bias=False).to(device, dtype), compress_statistics=nested)
              for n in ns]
    weights = [layer.weight for layer in layers]
    x = torch.randn(M, K, device=device, dtype=dtype)
    for got, want in zip(nf4_gemv(x, weights, use_triton=True), nf4_gemv_reference(x, weights)):
        _close(got, want, dtype, "gemv")
    if len(ns) >= 2:
        up = to_linear4bit(torch.nn.Linear(K, ns[0], bias=False).to(device, dtype), compress_statistics=nested)
        got, = nf4_gemv(x, [layers[0], up], "silu", use_triton=True)  # modules work as well as weights
        want, = nf4_gemv_reference(x, [layers[0].weight, up.weight], "silu")
        _close(got, want, dtype, "gemv.glu")


@pytest.mark.parametrize("pairs", [False, True], ids=["two-lookups", "pair-lookup"])
def test_nf4_gemv_code_lookups(pairs, device, monkeypatch):
    """Both ways of reading the codes (a 16-entry table per nibble, a 256-entry pair table per byte)."""
    monkeypatch.setitem(nf4_module.CONFIG, "dense", (16, 128, 4, pairs))
    layer = to_linear4bit(torch.nn.Linear(256, 24, bias=False).to(device), compress_statistics=True)
    x = torch.randn(2, 256, device=device)
    got, = nf4_gemv(x, [layer.weight], use_triton=True)
    want, = nf4_gemv_reference(x, [layer.weight])
    _close(got, want, torch.float32, "gemv")


def test_nf4_gemv_falls_back_where_the_kernel_cannot_run(device):
    """K not a multiple of the quantization block: a block crosses rows, so the reference runs (and
    use_triton=True says why it cannot)."""
    layer = to_linear4bit(torch.nn.Linear(96, 8, bias=False).to(device), compress_statistics=True)  # 96 % 64 != 0
    x = torch.randn(2, 96, device=device)
    got, = nf4_gemv(x, [layer.weight])
    want, = nf4_gemv_reference(x, [layer.weight])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="quantization block"):
        nf4_gemv(x, [layer.weight], use_triton=True)


def test_bad_inputs_are_named(device):
    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="1 <= M <= 8"):
        gemv(torch.randn(9, 16, device=device), [w])
    with pytest.raises(ValueError, match="weight 0 must be"):
        gemv(torch.randn(1, 32, device=device), [w])
    with pytest.raises(ValueError, match="activation='relu'"):
        gemv(torch.randn(1, 16, device=device), [w, w], "relu")
    with pytest.raises(ValueError, match="exactly the \\(gate, up\\)"):
        gemv(torch.randn(1, 16, device=device), [w], "silu")


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama-norm", "gemma-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_prologue(offset, dtype, device):
    """norm=(w, eps, offset): the projections read RMSNorm(x) (one rounding, as the RMSNorm kernel)."""
    M, K, ns = SHAPES[1]
    x = torch.randn(M, K, device=device, dtype=dtype) * 3
    norm = ((torch.randn(K, device=device) * 0.1).to(dtype), 1e-6, offset)
    weights = [(torch.randn(n, K, device=device) * K ** -0.5).to(dtype) for n in ns]
    for got, want in zip(gemv(x, weights, norm=norm, use_triton=True), gemv_reference(x, weights, norm=norm)):
        _close(got, want, dtype, "gemv")
    pair = [weights[0], (torch.randn(ns[0], K, device=device) * K ** -0.5).to(dtype)]
    got, = gemv(x, pair, "silu", norm=norm, use_triton=True)
    want, = gemv_reference(x, pair, "silu", norm=norm)
    _close(got, want, dtype, "gemv.glu")
    layers = [to_linear4bit(torch.nn.Linear(K, n, bias=False).to(device, dtype)) for n in ns]
    for got, want in zip(nf4_gemv(x, [layer.weight for layer in layers], norm=norm, use_triton=True),
                         nf4_gemv_reference(x, [layer.weight for layer in layers], norm=norm)):
        _close(got, want, dtype, "gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_epilogue(dtype, device):
    """residual=r with one weight: r + x W^T (x W^T rounded first, as the decoder's `x + h`)."""
    M, K, ns = SHAPES[1]
    x = torch.randn(M, K, device=device, dtype=dtype)
    residual = torch.randn(M, ns[0], device=device, dtype=dtype)
    weight = (torch.randn(ns[0], K, device=device) * K ** -0.5).to(dtype)
    got, = gemv(x, [weight], residual=residual, use_triton=True)
    want, = gemv_reference(x, [weight], residual=residual)
    _close(got, want, dtype, "gemv")
    layer = to_linear4bit(torch.nn.Linear(K, ns[0], bias=False).to(device, dtype))
    got, = nf4_gemv(x, [layer.weight], residual=residual, use_triton=True)
    want, = nf4_gemv_reference(x, [layer.weight], residual=residual)
    _close(got, want, dtype, "gemv")
    with pytest.raises(ValueError, match="residual must be"):
        gemv(x, [weight, weight], residual=residual)
