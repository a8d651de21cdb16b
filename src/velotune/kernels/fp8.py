"""Row-wise FP8 (e4m3) quantization of a 2-D tensor in one pass: absmax per row, scale, cast.

Why a kernel: the FP8 base matmuls (fast/fp8_matmul.py) quantize an activation before every
GEMM (x in forward, the output gradient in backward). In PyTorch that is an abs, a max, a
division, a clamp and a cast, each a pass over an (N, K) tensor; here each row is read once
(rows up to `_ONE_PASS_COLS` wide stay in registers) and written once as 1-byte values.

Scales: scale[n] = max_k |x[n, k] * c[k]| / 448 (fp32, at least `TINY` / 448), y = x * c / scale
clamped to +-448 (e4m3's largest finite value; e4m3fn has no infinity, so a value rounded past it
would become NaN) and cast. `col_scale` c is optional: the backward quantizes dY * s_W (the
weight's row scales, which lie along dY's columns) so that dX = dY @ W needs only the FP8 weight
as stored (see fast/fp8_matmul.py).

Divisions are `div_rn` (IEEE, as PyTorch's): Triton's `/` on fp32 compiles to an approximate
division on the GPU. Rounding: the kernels round to the e4m3 grid in fp32 themselves (`round_to_e4m3`: round to
nearest even, as PyTorch's cast) and only then cast, so the cast is exact wherever it runs. The
GPU's conversion rounds to nearest even too, but Triton's interpreter (CI's CPU path) does not, and
CI tests the kernels bit for bit against the PyTorch reference through the interpreter.
"""

import torch

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
TINY = 1e-12  # an all-zero row gets scale TINY / 448 and zeros, never a division by zero
# A row up to _ONE_PASS_COLS wide is held in registers; wider ones loop twice over _LOOP_BLOCK columns.
# H200 (bench_fp8.py kernels, 4096 rows): at 14336 columns (Llama-8B's down-projection input and gate/up
# gradient) two passes of 2048 take 0.084-0.097 ms against one pass's 0.167-0.192 (a 16-warp program an
# SM); at 4096 columns both take 0.034-0.037 ms.
_ONE_PASS_COLS = 8192
_LOOP_BLOCK = 2048


@jit
def round_to_e4m3(v):
    """fp32 values within +-448 -> the nearest e4m3 value (ties to even), still fp32.

    Normal range (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits, rounding on the bit pattern
    (a carry moves into the exponent, as it should). Subnormal range: multiples of 2^-9, by the
    add-and-subtract of 2^14, whose fp32 spacing is exactly 2^-9 (the FPU rounds to even)."""
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    small = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, small, normal)
    return tl.where(v < 0, -r, r)


@jit
def _quantize_rows_kernel(
    X, COL_SCALE, Y, SCALE,  # X (N, K) any float, COL_SCALE (K,) fp32, Y (N, K) e4m3, SCALE (N,) fp32
    n_cols, stride_x, stride_y,
    HAS_COL: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        if HAS_COL:
            x = x * tl.load(COL_SCALE + cols, mask=mask, other=0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
        y = round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0))
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:  # wider rows: one pass for the absmax, one to cast (both over BLOCK-wide slices)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(COL_SCALE + cols, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(COL_SCALE + cols, mask=mask, other=0.0)
            y = round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0))
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(SCALE + row, scale)


def quantize_fp8_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """Plain PyTorch: x (N, K) -> (y (N, K) e4m3, scale (N, 1) fp32) with x * c ~= y * scale."""
    xf = x.float()  # (N, K)
    if col_scale is not None:
        xf = xf * col_scale.float()  # (K,) broadcast along rows
    # Divide by a tensor, not the Python number: on CUDA PyTorch turns division by a scalar into a
    # multiplication by its reciprocal, one rounding off the kernel's (and the CPU's) true division.
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(TINY)
    scale = amax / torch.full((), FP8_MAX, dtype=torch.float32, device=xf.device)  # (N, 1)
    y = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return y, scale


def quantize_fp8_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None, *, use_triton: bool | None = None):
    """x (N, K) -> (y (N, K) float8_e4m3fn, scale (N, 1) fp32), row by row: x[n] * c ~= y[n] * scale[n].

    `col_scale` (K,) multiplies each column before quantizing (the backward's weight row scales).
    Triton on CUDA (and the interpreter), the reference elsewhere; no autograd (callers own it).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_rows: x must be 2-D (rows, columns), got shape {tuple(x.shape)}")
    if col_scale is not None and col_scale.numel() != x.shape[1]:
        raise ValueError(f"quantize_fp8_rows: col_scale has {col_scale.numel()} values for {x.shape[1]} columns")
    if not should_use_triton(x, use_triton):
        return quantize_fp8_rows_reference(x, col_scale)
    n, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((n, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, scale
    col = scale if col_scale is None else col_scale.to(device=x.device, dtype=torch.float32).contiguous()
    one_pass = k <= _ONE_PASS_COLS
    block = next_power_of_2(k) if one_pass else _LOOP_BLOCK
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    kernel_for(_quantize_rows_kernel)[(n,)](
        x, col, y, scale, k, x.stride(0), y.stride(0),
        HAS_COL=col_scale is not None, BLOCK=block, ONE_PASS=one_pass, num_warps=warps,
    )  # fmt: skip
    return y, scale


def dequantize_fp8_rows(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) e4m3 values and their (N,) or (N, 1) fp32 row scales -> (N, K) in `dtype` (fp32 product, one cast)."""
    return (y.float() * scale.reshape(-1, 1).float()).to(dtype)
