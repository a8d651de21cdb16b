"""NF4 (bitsandbytes layout) straight to the *transposed* FP8 e4m3 weight, (in, out) row-major, in one pass.

Why: the FP8 backward dX = q(dY s_W) W8 (fast/fp8_matmul.py) needs W8 column-major (cuBLAS' second
FP8 operand), i.e. W8^T stored row-major. Converting NF4 -> e4m3 (kernels/nf4_fp8.py) and then
transposing writes the 1-byte weight twice and reads it once more; this kernel writes the transposed
layout directly, so a backward reads the packed codes once and writes each value once.

Math: exactly kernels/nf4_fp8.py's per value (w = quant_map[code] * absmax[block] in fp32,
clamp(w * inv_row[row], +-448), round to nearest even on the e4m3 grid, cast), so the result is
bit-identical to `dequantize_nf4_to_fp8(w)[0].t().contiguous()`; only the tiling differs.

Tiling: a program owns a (BLOCK_R rows, BLOCK_C columns) tile of the (out, in) weight, held as
(BLOCK_R, BLOCK_C / BLOCKSIZE, BLOCKSIZE): each quantization block's BLOCKSIZE / 2 packed bytes are
one contiguous (vectorized) read, its scale one load broadcast over the block (two codes a byte,
high nibble first, so `tl.interleave` restores row order). The tile is stored permuted to
(columns, rows) (`tl.permute`, through shared memory), so the writes are row-contiguous too. It
needs blocks that do not straddle rows (in_features % blocksize == 0, every Llama-style shape):
other shapes are converted row-major and then transposed (kernels/fp8_transpose.py), which is
bit-identical too.
"""

import torch

from ._triton import jit, tl
from .fp8 import FP8_DTYPE, FP8_MAX, round_to_e4m3
from .nf4 import block_scales

# (BLOCK_R, BLOCK_C, num_warps): 64 weight rows x 128 columns = 8 KiB of e4m3 a program (the stores
# write 64 contiguous bytes of each of 128 output rows).
TILE = (64, 128, 4)


@jit
def nf4_fp8_tile(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW,
    n_rows, row_blocks,  # the weight's out_features, and in_features // BLOCKSIZE (blocks never straddle rows)
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """This program's (BLOCK_R rows, BLOCK_C columns) tile of an NF4 weight as e4m3 values (still fp32, on the
    grid), with its indices: (y (BR, NB, BS) in row order, rows (BR,), col_blocks (NB,), row_ok, col_ok,
    blocks (BR, NB) flat block indices, block_ok). The reads and math of both tiled conversions (this file's
    transposed one, nf4_fp8.py's row-major one); they differ in their stores only."""
    NB: tl.constexpr = BLOCK_C // BLOCKSIZE  # quantization blocks per tile row
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) weight rows
    col_blocks = tl.program_id(1) * NB + tl.arange(0, NB)  # (NB,) block index within a row
    if IDX64:
        rows = rows.to(tl.int64)
        col_blocks = col_blocks.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = col_blocks < row_blocks
    block_ok = row_ok[:, None] & col_ok[None, :]  # (BR, NB)
    blocks = rows[:, None] * row_blocks + col_blocks[None, :]  # (BR, NB) flat block indices
    byte_offs = blocks[:, :, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, None, :]  # (BR, NB, BS/2)
    byte = tl.load(PACKED + byte_offs, mask=block_ok[:, :, None], other=0).to(tl.int32)
    scale = block_scales(ABSMAX, NESTED_ABSMAX, NESTED_MAP, OFFSET, blocks, block_ok,
                         NESTED, NESTED_BLOCKSIZE)  # (BR, NB)
    hi = tl.load(QUANT_MAP + (byte >> 4)) * scale[:, :, None]  # (BR, NB, BS/2) fp32
    lo = tl.load(QUANT_MAP + (byte & 15)) * scale[:, :, None]
    w = tl.interleave(hi, lo)  # (BR, NB, BS) in row order
    inv = tl.load(INV_ROW + rows, mask=row_ok, other=0.0)  # (BR,) the row's 448 / absmax
    y = round_to_e4m3(w * inv[:, None, None])  # saturates at +-448 (the reference's clamp)
    return y, rows, col_blocks, row_ok, col_ok, blocks, block_ok


@jit
def _nf4_to_fp8_t_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, OUT,  # OUT (in, out) uint8 view
    n_rows, row_blocks,  # the weight's out_features, and in_features // BLOCKSIZE (blocks never straddle rows)
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    y, rows, col_blocks, row_ok, col_ok, _, _ = nf4_fp8_tile(
        PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, n_rows, row_blocks,
        BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, BLOCK_R, BLOCK_C, IDX64)  # y (BR, NB, BS)
    y = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)  # e4m3 (torch's float8_e4m3fn), moved as bytes
    cols = col_blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (NB, BS) weight columns
    tl.store(OUT + cols[:, :, None] * n_rows + rows[None, None, :], tl.permute(y, (1, 2, 0)),
             mask=col_ok[:, None, None] & row_ok[None, None, :])  # (NB, BS, BR)


def nf4_to_fp8_transposed_reference(w: torch.Tensor, inv_row: torch.Tensor) -> torch.Tensor:
    """A dense fp32 weight (out, in) and its (out,) inverse row scales -> (in, out) e4m3, row-major."""
    return (w.float() * inv_row.reshape(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).t().contiguous()


def transposed_launch(shape: tuple[int, int], blocksize: int, nested_blocksize: int, nested: bool):
    """(kernel, grid, out shape, scalar args, meta) of one weight's transposed conversion, or None when
    this kernel does not apply: quantization blocks that straddle rows (in_features % blocksize), or blocks
    wider than a tile (bitsandbytes' QLoRA default is 64)."""
    out_features, in_features = shape
    block_r, block_c, warps = TILE
    if in_features % blocksize or blocksize > block_c or blocksize < 2:
        return None
    grid = (-(-out_features // block_r), -(-in_features // block_c))
    idx64 = (out_features + block_r) * (in_features + block_c) >= 2**31
    meta = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested, BLOCK_R=block_r,
                BLOCK_C=block_c, IDX64=idx64, num_warps=warps, enable_fp_fusion=False)
    return _nf4_to_fp8_t_kernel, grid, (in_features, out_features), (out_features, in_features // blocksize), meta
