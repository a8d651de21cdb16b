"""NF4 (bitsandbytes layout) straight to the *transposed* FP8 e4m3 weight, (in, out) row-major, in one pass.

Why: the FP8 backward dX = q(dY s_W) W8 (fast/fp8_matmul.py) needs W8 column-major (cuBLAS' second
FP8 operand), i.e. W8^T stored row-major. Converting NF4 -> e4m3 (kernels/nf4_fp8.py) and then
transposing writes the 1-byte weight twice and reads it once more; this kernel writes the transposed
layout directly, so a backward reads the packed codes once and writes each value once.

Math: exactly kernels/nf4_fp8.py's per value (w = quant_map[code] * absmax[block] in fp32,
clamp(w * inv_row[row], +-448), round to nearest even on the e4m3 grid, cast), so the result is
bit-identical to `dequantize_nf4_to_fp8(w)[0].t().contiguous()`; only the tiling differs.

Tiling: a program owns a (BLOCK_R rows, BLOCK_C columns) tile of the (out, in) weight. It reads
BLOCK_C / 2 packed bytes per row (two codes a byte, high nibble first, so `tl.interleave` restores
row order), looks up each byte's block scale (a gather of at most a few distinct addresses per
row, which the cache serves; a block may straddle rows, as in bitsandbytes' flat layout), and
stores the tile transposed through `tl.trans` (shared memory), so both the read and the write are
row-contiguous. It needs in_features even (a row then starts on a byte boundary): callers use the
untransposed kernel plus a transpose otherwise.
"""

import torch

from ._triton import jit, tl
from .fp8 import FP8_DTYPE, FP8_MAX, round_to_e4m3

# (BLOCK_R, BLOCK_C, num_warps): 64 weight rows x 128 columns = 8 KiB of e4m3 a program (the stores
# write 64 contiguous bytes of each of 128 output rows).
TILE = (64, 128, 4)


@jit
def _nf4_to_fp8_t_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, OUT,  # OUT (in, out) uint8 view
    n_rows, n_cols,  # the weight's (out, in); n_cols even
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) weight rows = output columns
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,) weight columns = output rows
    high = tl.program_id(1) * BLOCK_C + 2 * tl.arange(0, BLOCK_C // 2)  # (BC/2,) columns of the high nibbles
    if IDX64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        high = high.to(tl.int64)
    row_ok = rows < n_rows
    byte_ok = row_ok[:, None] & (high[None, :] < n_cols)  # (BR, BC/2)
    flat = rows[:, None] * n_cols + high[None, :]  # (BR, BC/2) flat index of each high nibble (even)
    byte = tl.load(PACKED + flat // 2, mask=byte_ok, other=0).to(tl.int32)
    block = flat // BLOCKSIZE  # both nibbles of a byte lie in one block (BLOCKSIZE is even)
    if NESTED:
        q = tl.load(ABSMAX + block, mask=byte_ok, other=0).to(tl.int32)
        nested_absmax = tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=byte_ok, other=0.0)
        scale = tl.load(NESTED_MAP + q) * nested_absmax
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=byte_ok, other=0.0)
    hi = tl.load(QUANT_MAP + (byte >> 4)) * scale  # (BR, BC/2) fp32
    lo = tl.load(QUANT_MAP + (byte & 15)) * scale
    w = tl.interleave(hi, lo)  # (BR, BC) in row order
    inv = tl.load(INV_ROW + rows, mask=row_ok, other=0.0)  # (BR,) the row's 448 / absmax
    y = round_to_e4m3(tl.minimum(tl.maximum(w * inv[:, None], -448.0), 448.0))
    y = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)  # e4m3 (torch's float8_e4m3fn), moved as bytes
    tl.store(OUT + cols[:, None] * n_rows + rows[None, :], tl.trans(y),
             mask=(cols[:, None] < n_cols) & row_ok[None, :])  # (BC, BR)


def nf4_to_fp8_transposed_reference(w: torch.Tensor, inv_row: torch.Tensor) -> torch.Tensor:
    """A dense fp32 weight (out, in) and its (out,) inverse row scales -> (in, out) e4m3, row-major."""
    return (w.float() * inv_row.reshape(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).t().contiguous()


def transposed_launch(shape: tuple[int, int], blocksize: int, nested_blocksize: int, nested: bool):
    """(kernel, grid, out shape, scalar args, meta) of one weight's transposed conversion, or None when
    this kernel does not apply (odd in_features; block sizes the interleave cannot tile)."""
    out_features, in_features = shape
    if in_features % 2 or blocksize < 2 or blocksize % 2:
        return None
    block_r, block_c, warps = TILE
    n = out_features * in_features
    grid = (-(-out_features // block_r), -(-in_features // block_c))
    idx64 = (out_features + block_r) * (in_features + block_c) >= 2**31
    meta = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested, BLOCK_R=block_r,
                BLOCK_C=block_c, IDX64=idx64 or n >= 2**31, num_warps=warps, enable_fp_fusion=False)
    return _nf4_to_fp8_t_kernel, grid, (in_features, out_features), (out_features, in_features), meta
