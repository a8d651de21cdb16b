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

Divisions give IEEE's correctly rounded quotient, as PyTorch's (Triton's `/` on fp32 compiles to an
approximate division on the GPU): `div_rn` once a row for the scale and its reciprocal, then per value
a multiplication and two fmas (`_quantize_values` says why that is exact). Rounding: the kernels
round to the e4m3 grid in fp32 themselves (`round_to_e4m3`: round to nearest even, as PyTorch's cast,
saturating at 448) and only then cast, so the cast is exact wherever it runs. The
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
# One-pass programs hold _PROGRAM_VALUES values (whole rows: 2 of 4096 columns, 8 of 1024), each thread
# _THREAD_VALUES of a row (4096 columns: 4 warps; 1024: one warp, whose row reductions need no barrier).
# One row a program made 4096 programs of 8 warps for an 8B activation, each waiting on its own load,
# reduction and store; several rows a program share the column scales' load and overlap one row's
# reduction with the next row's loads. Not yet measured on the H200 (bench_fp8.py conversions sweeps it).
_ONE_PASS_COLS = 8192
_PROGRAM_VALUES = 8192
_THREAD_VALUES = 32
_L2_HINTS = True  # two-pass rows: keep the row in L2 between the passes (see the kernel)
_MAX_ROWS = 16  # the row loop is unrolled: narrow rows (tests, tiny models) would otherwise compile 64 copies
_LOOP_BLOCK = 2048


@jit
def round_to_e4m3(v):
    """fp32 values -> the nearest e4m3 value (ties to even), saturated at +-448, still fp32.

    Same bits as clamp(v, +-448) then PyTorch's cast (checked for every fp32 pattern below 500 in
    magnitude, both signs, subnormals included).
    """
    return _round_magnitude(tl.abs(v), v.to(tl.uint32, bitcast=True) & 0x80000000)


@jit
def _round_magnitude(a, sign):
    """a >= 0 (fp32) rounded to e4m3 as `round_to_e4m3`, with the sign bits `sign` (uint32) or-ed back.

    Three instructions a value fewer than the earlier bit-pattern rounding with the callers' clamp
    (sm_90 SASS of a load, round, store kernel: 12.75 against 15.75 a value), which rounded normal
    and subnormal values separately, selected, then restored the sign by a compare and a select.
    Here one path serves both ranges: with E = max(exponent(a), -6), c = 2^(E + 20) puts
    a + c in the binade whose fp32 spacing is 2^(E - 3), e4m3's spacing at a's exponent (2^-9, the
    subnormal spacing, below 2^-6); the FPU rounds the sum to nearest even (c is an even multiple of
    that spacing, so the evenness is a's own) and subtracting c is exact. min(a, 448) is the callers'
    clamp folded in (e4m3fn has no infinity: a value rounded past 448 would become NaN)."""
    a = tl.minimum(a, 448.0)
    exponent = tl.maximum(a.to(tl.uint32, bitcast=True) & 0x7F800000, 0x3C800000)  # 0x3C800000: 2^-6
    c = (exponent + (20 << 23)).to(tl.float32, bitcast=True)  # 2^(E + 20)
    r = (a + c) - c
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@jit
def _quantize_values(x, scale, inv):
    """fp32 values x and their row's scale (and inv = 1 / scale, correctly rounded) -> x / scale rounded
    to e4m3, fp32, bit for bit what IEEE division then the cast give.

    Why not `div_rn` per value: ptxas emits it as a reciprocal (MUFU), two refinements, the quotient, a
    residual and a correction, plus a range check and a branch, about 10 instructions a value, the
    reciprocal redone for every value of the row. With the row's correctly rounded reciprocal computed
    once, q = |x| * inv, r = fma(-q, scale, |x|) (exact), q + r * inv (one fma) is the correctly rounded
    quotient (Markstein's theorem: the reciprocal within half an ulp of 1 / scale and q within one ulp
    of the quotient; no underflow where it matters: scale >= TINY / 448, so a quotient near e4m3's
    smallest rounding boundary 2^-10 has |x| >= 2^-59 and r stays normal). Checked on 3 x 126M
    (x, scale) pairs against numpy's IEEE division (random, quotients within 2 ulps of every e4m3
    midpoint, the row's absmax and its neighbours, tiny values) with the interpreter's fp32 fma: no
    difference. The magnitude is divided and x's own sign bit or-ed back, so -0.0 stays -0.0 (the
    residual's +0 would turn -0.0 / scale into +0.0)."""
    ax = tl.abs(x)
    q = ax * inv
    q = tl.fma(tl.fma(-q, scale, ax), inv, q)
    return _round_magnitude(q, x.to(tl.uint32, bitcast=True) & 0x80000000)


@jit
def _quantize_rows_kernel(
    X, COL_SCALE, Y, SCALE,  # X (N, K) any float, COL_SCALE (K,) fp32, Y (N, K) e4m3, SCALE (N,) fp32
    n_rows, n_cols, stride_x, stride_y,
    HAS_COL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr,
    L2_HINTS: tl.constexpr,
):  # fmt: skip
    if ONE_PASS:  # ROWS whole rows a program, one after the other (unrolled), each held in registers
        # Rows as a loop, not an (ROWS, BLOCK) tile: the column scales (BLOCK,) then share the rows' 1-D
        # layout; broadcast over a 2-D tile, Triton converted the whole tile through shared memory to
        # match the fp32 scales' layout (sm_90 SASS: 8 stmatrix and 16 more barriers a program).
        cols = tl.arange(0, BLOCK)
        col_ok = cols < n_cols
        if HAS_COL:
            c = tl.load(COL_SCALE + cols, mask=col_ok, other=0.0)  # (BLOCK,), once for the program's rows
        first = tl.program_id(0).to(tl.int64) * ROWS
        for r in tl.static_range(ROWS):
            row = first + r
            ok = cols < tl.where(row < n_rows, n_cols, 0)  # a row past the end: no column (`&` of a scalar
            # bool and a tensor gives a mask the interpreter rejects)
            x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
            if HAS_COL:
                x = x * c
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
            y = _quantize_values(x, scale, tl.math.div_rn(1.0, scale))
            tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)
            tl.store(SCALE + row, scale, mask=row < n_rows)
    else:  # one wider row a program: one pass for the absmax, one to cast (both over BLOCK-wide slices)
        # The first pass asks L2 to keep the row (evict_last) and the second lets it go (evict_first): the
        # second read should come from L2, not HBM (a 14336-wide bf16 row is 28 KB; ~2,000 resident programs
        # span more than the H200's 50 MB L2). Hints only: the values are the same. `_L2_HINTS` switches them
        # (not yet measured: bench_fp8.py conversions times both).
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * stride_y
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            if L2_HINTS:
                x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(COL_SCALE + cols, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
        inv = tl.math.div_rn(1.0, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            if L2_HINTS:
                x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(COL_SCALE + cols, mask=mask, other=0.0)
            y = _quantize_values(x, scale, inv)
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
    one_pass, block, rows, warps = _launch_shape(k)
    kernel_for(_quantize_rows_kernel)[(-(-n // rows),)](
        x, col, y, scale, n, k, x.stride(0), y.stride(0),
        HAS_COL=col_scale is not None, BLOCK=block, ROWS=rows, ONE_PASS=one_pass, L2_HINTS=_L2_HINTS,
        num_warps=warps,
    )  # fmt: skip
    return y, scale


def _launch_shape(k: int) -> tuple[bool, int, int, int]:
    """(one pass, BLOCK, rows a program, warps) for rows of k columns (module constants: the bench sweeps them)."""
    if k > _ONE_PASS_COLS:
        return False, _LOOP_BLOCK, 1, 4 if _LOOP_BLOCK <= 2048 else 8
    block = next_power_of_2(k)
    rows = max(1, min(_MAX_ROWS, _PROGRAM_VALUES // block))
    return True, block, rows, min(16, max(1, block // (32 * _THREAD_VALUES)))


def dequantize_fp8_rows(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) e4m3 values and their (N,) or (N, 1) fp32 row scales -> (N, K) in `dtype` (fp32 product, one cast)."""
    return (y.float() * scale.reshape(-1, 1).float()).to(dtype)
