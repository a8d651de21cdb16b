"""The FP8 kernels (kernels/fp8.py, kernels/nf4_fp8.py, the backward's transposed layouts of
kernels/fp8_transpose.py and kernels/nf4_fp8_transposed.py) through Triton's interpreter, bit for bit
against their PyTorch references (both round to nearest even before the cast), and the FP8 GEMMs
(fast/fp8_matmul.py, torch's CPU `_scaled_mm`) against the same FP8 values multiplied in fp32 and
against the 16-bit weight they stand for, within e4m3's precision."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels import fp8 as fp8_kernels
from velotune.kernels.fp8 import FP8_MAX, dequantize_fp8_rows, quantize_fp8_rows, quantize_fp8_rows_reference
from velotune.kernels.fp8_transpose import transpose_bytes
from velotune.kernels.nf4_fp8 import dequantize_nf4_to_fp8, nf4_to_fp8_reference
from velotune.kernels.nf4_fp8_transposed import nf4_to_fp8_transposed_reference


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _rows(n=24, k=80, seed=0) -> torch.Tensor:
    """Rows spanning 8 decades (subnormal e4m3 values appear), a zero row and a row of tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.logspace(-6, 2, n)[:, None]
    x[3] = 0
    x[5, : k // 2] = 1e-9
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_col", [False, True])
def test_quantize_rows_matches_reference_bit_for_bit(device, dtype, with_col):
    x = _rows().to(device, dtype)
    col = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5).to(device)
    col = col if with_col else None
    y, scale = quantize_fp8_rows(x, col, use_triton=True)
    y_ref, scale_ref = quantize_fp8_rows_reference(x, col)
    assert y.dtype == torch.float8_e4m3fn and scale.shape == (x.shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.equal(_bits(y), _bits(y_ref))
    assert y.float().abs().amax(1)[torch.arange(x.shape[0]) != 3].eq(FP8_MAX).all()  # each row reaches 448
    assert y[3].float().eq(0).all()


def test_quantize_rows_two_pass_for_wide_rows(device, monkeypatch):
    """Rows wider than the one-pass limit loop twice (absmax, then cast): the same bits."""
    monkeypatch.setattr(fp8_kernels, "_ONE_PASS_COLS", 64)
    monkeypatch.setattr(fp8_kernels, "_LOOP_BLOCK", 32)
    x = _rows(n=6, k=100).to(device)
    col = torch.rand(100, generator=torch.Generator().manual_seed(2)).to(device) + 0.5
    y, scale = quantize_fp8_rows(x, col, use_triton=True)
    y_ref, scale_ref = quantize_fp8_rows_reference(x, col)
    assert torch.equal(_bits(y), _bits(y_ref)) and torch.equal(scale, scale_ref)


def _near_e4m3_midpoints() -> torch.Tensor:
    """fp32 values on, and 1-2 ulps either side of, every e4m3 rounding boundary (ties between grid
    values, the saturation at 448, the flush to zero at 2^-10), both signs, -0.0 and values past 448."""
    grid = torch.tensor(sorted({m / 8 * 2.0**e for e in range(-6, 9) for m in range(8, 16)} |
                               {k * 2.0**-9 for k in range(8)}), dtype=torch.float64)
    mids = torch.cat([(grid[:-1] + grid[1:]) / 2, grid, torch.tensor([2.0**-10, 464.0, 480.0, 1e4])]).float()
    bits = mids.view(torch.int32)[:, None] + torch.arange(-2, 3, dtype=torch.int32)[None, :]
    v = bits.reshape(-1).view(torch.float32)
    v = v[v.isfinite()]  # 0.0's neighbours below are NaN patterns
    return torch.cat([v, -v, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])


@pytest.mark.parametrize("with_col", [False, True])
def test_quantize_rows_ties_signed_zeros_and_partial_programs(device, with_col):
    """Quotients x / scale on and beside e4m3's ties (the kernel divides by fma correction from the row's
    reciprocal, the reference by IEEE division), -0.0 kept, and a row count that leaves the last
    several-row program partly empty (13 rows of 1000 columns: 8 rows a program)."""
    mids = _near_e4m3_midpoints()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 1000, generator=g) * torch.logspace(-5, 3, 13)[:, None]
    x[:, 0] = x.abs().amax(1)  # each row's absmax at column 0, so the scale is known before the ties are placed
    scale = (x[:, :1] / torch.full((), FP8_MAX))  # (13, 1) as the kernel computes it
    picks = mids[torch.randint(0, mids.numel(), (13, 999), generator=g)]
    x[:, 1:] = (picks.double() * scale.double()).float().clamp(-x[:, :1], x[:, :1])  # quotients at the ties
    x[2, 5:9] = -0.0
    x = x.to(device)
    col = torch.ones(1000, device=device) if with_col else None
    y, s = quantize_fp8_rows(x, col, use_triton=True)
    y_ref, s_ref = quantize_fp8_rows_reference(x, col)
    assert torch.equal(s, s_ref) and torch.equal(_bits(y), _bits(y_ref))
    assert _bits(y)[2, 5:9].eq(0x80).all()  # -0.0


def test_round_to_e4m3_near_every_boundary(device):
    """The kernels' rounding (one path for normal and subnormal e4m3 values, saturating at 448) against
    clamp then PyTorch's cast, on values around every rounding boundary, through a one-pass quantization
    whose row scale is exactly 1 (absmax 448)."""
    v = _near_e4m3_midpoints()
    row = torch.cat([torch.tensor([448.0]), v.clamp(-448, 448)])
    y, scale = quantize_fp8_rows(row[None, :].to(device), use_triton=True)
    assert scale.item() == 1.0
    assert torch.equal(_bits(y)[0].cpu(), _bits(row.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)))


def test_reference_round_trip_within_e4m3_precision():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    y, scale = quantize_fp8_rows_reference(x)
    back = dequantize_fp8_rows(y, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative step 2^-3, so rounding errs by at most 2^-4 of a normal value
    normal = x.abs() >= scale * 2**-6
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-12)[normal].all()
    assert _rel(back, x) < 0.03


def test_quantize_rows_errors_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="col_scale has 3 values for 4 columns"):
        quantize_fp8_rows(torch.zeros(2, 4), torch.ones(3))


def _nf4_weight(out_features=48, in_features=96, nested=True, seed=0, dtype=torch.float32):
    from velotune.quant.linear import to_linear4bit

    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(dtype)
    return to_linear4bit(linear, compute_dtype=dtype, compress_statistics=nested).weight


@pytest.mark.parametrize("nested", [True, False])
# (32, 128): row scales from the block scales; (48, 96), (40, 72): blocks straddle rows, scales from the values
@pytest.mark.parametrize("shape", [(32, 128), (48, 96), (40, 72)])
def test_nf4_to_fp8_matches_reference_bit_for_bit(device, nested, shape):
    from velotune.kernels import dequantize_nf4_weight

    weight = _nf4_weight(*shape, nested=nested)
    if device.type == "cuda":
        weight = weight.cuda()
    values, scale = dequantize_nf4_to_fp8(weight, use_triton=True)
    dense = dequantize_nf4_weight(weight, use_triton=False).float()  # the NF4 values, fp32
    torch.testing.assert_close(scale, (dense.abs().amax(1) / FP8_MAX).to(scale.device), rtol=0, atol=0)
    assert torch.equal(_bits(values), _bits(nf4_to_fp8_reference(dense, FP8_MAX / dense.abs().amax(1))))
    assert _rel(values.float() * scale[:, None], dense) < 0.03
    # the PyTorch path (no Triton) gives the same bits
    plain, plain_scale = dequantize_nf4_to_fp8(weight, use_triton=False)
    assert torch.equal(_bits(plain), _bits(values)) and torch.equal(plain_scale, scale)


# (shape, tile): tiles that do not divide the shape on either side, the default tile, a strided (transposed) input
@pytest.mark.parametrize("shape, tile", [((100, 70), (64, 64, 4)), ((33, 200), (32, 64, 4)), ((130, 129), None)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8])
def test_transpose_bytes_equals_t_contiguous(device, shape, tile, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 100).to(device)
    x = x.to(dtype) if dtype.is_floating_point else x.to(torch.int16).to(dtype)  # uint8: wrapped integers
    y = transpose_bytes(x, tile=tile, use_triton=True)
    assert y.dtype == dtype and y.shape == shape[::-1] and y.is_contiguous()
    assert torch.equal(_bits(y), _bits(x.t().contiguous()))
    strided = x.t()  # (C, R) with strides (1, C): read through its strides, not copied first
    assert torch.equal(_bits(transpose_bytes(strided, tile=tile, use_triton=True)), _bits(x))


def test_transpose_bytes_errors_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        transpose_bytes(torch.zeros(2, 3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one-byte dtype.*bfloat16"):
        transpose_bytes(torch.zeros(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("nested", [True, False])
# the kernel: (32, 128) one tile's columns; (70, 192), (130, 64): tiles cut rows and columns.
# Converted row-major, then transposed: (40, 72) blocks straddle rows; (24, 77) odd in_features
@pytest.mark.parametrize("shape", [(32, 128), (70, 192), (130, 64), (40, 72), (24, 77)])
def test_nf4_to_fp8_transposed_equals_transpose_of_untransposed(device, nested, shape):
    from velotune.kernels import dequantize_nf4_weight
    from velotune.kernels.nf4_fp8_transposed import transposed_launch

    weight = _nf4_weight(*shape, nested=nested)
    assert (transposed_launch(shape, 64, 256, nested) is not None) == (shape[1] % 64 == 0)
    if device.type == "cuda":
        weight = weight.cuda()
    values, scale = dequantize_nf4_to_fp8(weight, use_triton=True)
    values_t, scale_t = dequantize_nf4_to_fp8(weight, transposed=True, use_triton=True)
    assert values_t.shape == shape[::-1] and values_t.is_contiguous() and values_t.dtype == torch.float8_e4m3fn
    assert torch.equal(_bits(values_t), _bits(values.t().contiguous())) and torch.equal(scale_t, scale)
    again, _ = dequantize_nf4_to_fp8(weight, transposed=True, use_triton=True)  # the cached launch
    assert torch.equal(_bits(again), _bits(values_t))
    dense = dequantize_nf4_weight(weight, use_triton=False).float()  # (out, in) fp32
    reference = nf4_to_fp8_transposed_reference(dense, FP8_MAX / dense.abs().amax(1))
    assert torch.equal(_bits(values_t), _bits(reference))
    plain, plain_scale = dequantize_nf4_to_fp8(weight, transposed=True, use_triton=False)
    assert torch.equal(_bits(plain), _bits(values_t)) and torch.equal(plain_scale, scale)


def test_fp8_gemms_match_the_fp32_product_of_the_same_values():
    """Forward x W^T and backward dY W with row-wise scales, vs fp32 math on the dequantized operands;
    the backward folds W's row scales into dY's columns before quantizing dY."""
    from velotune.fast.fp8_matmul import fp8_grad_input, fp8_linear, quantize_input
    from velotune.fast.lora_linear import LoraProjection
    from velotune.quant.fp8 import quantize_weight_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-2, 0, 48)[:, None]  # rows of very different scale
    bias = torch.randn(48, generator=g)
    values, scale = quantize_weight_fp8(w)
    p = LoraProjection(values, bias, None, None, 0.0, scale, fp8=True)
    x = torch.randn(32, 64, generator=g)
    x8, sx = quantize_input(x)
    y = fp8_linear(x8, sx, p, torch.float32)
    w_deq = values.float() * scale[:, None]
    exact = (x8.float() * sx) @ w_deq.t() + bias
    assert _rel(y, exact) < 1e-2  # the bf16 output of _scaled_mm
    assert _rel(y, x @ w.t() + bias) < 0.06
    grad = torch.randn(32, 48, generator=g)
    dx = fp8_grad_input(grad, p, torch.float32)
    g8, sg = quantize_fp8_rows_reference(grad, scale)
    assert _rel(dx, (g8.float() * sg) @ values.float()) < 1e-2
    assert _rel(dx, grad @ w) < 0.06


def test_fp8_weight_from_each_storage():
    """FP8 storage as is, NF4 through its converter, a 16-bit weight quantized on the fly."""
    from velotune.fast.fp8_matmul import fp8_weight
    from velotune.fast.lora_linear import LoraProjection
    from velotune.quant.fp8 import quantize_weight_fp8

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    values, scale = quantize_weight_fp8(w)
    stored = LoraProjection(values, None, None, None, 0.0, scale, fp8=True)
    on_the_fly = LoraProjection(w, None, None, None, 0.0, None, fp8=True)
    for p in (stored, on_the_fly):
        v, s = fp8_weight(p)
        assert torch.equal(_bits(v), _bits(values)) and torch.equal(s, scale)
        vt, _ = fp8_weight(p, transposed=True)
        assert vt.shape == (48, 32) and vt.is_contiguous() and torch.equal(_bits(vt), _bits(values.t()))
    nf4 = LoraProjection(_nf4_weight(32, 64), None, None, None, 0.0, None, fp8=True)
    v, s = fp8_weight(nf4)
    assert v.shape == (32, 64) and s.shape == (32,)
    vt, st = fp8_weight(nf4, transposed=True)  # written transposed by the NF4 kernel, the same bytes
    assert vt.shape == (64, 32) and vt.is_contiguous() and torch.equal(_bits(vt), _bits(v.t())) and torch.equal(st, s)
