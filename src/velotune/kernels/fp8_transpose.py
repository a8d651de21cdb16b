"""Transpose of a 2-D one-byte tensor (e4m3 FP8 weights) into a new row-major tensor, tile by tile.

Why: the FP8 backward dX = q(dY s_W) W8 (fast/fp8_matmul.py) needs W8 column-major as cuBLAS' second
FP8 operand, i.e. an (in, out) row-major copy of the (out, in) weight, made per backward and dropped.
`W8.t().contiguous()` measured 0.099 ms for 4096 x 4096 and 0.34 ms for 14336 x 4096 on the H200
(~0.35 TB/s: PyTorch's generic copy walks one side of the transpose byte by byte, uncoalesced). Here a
program loads a (BLOCK_R, BLOCK_C) tile with coalesced row reads, `tl.trans` moves it through shared
memory, and the (BLOCK_C, BLOCK_R) result is written with coalesced row writes: each byte is read
once and written once.

The values are moved as uint8 (a view of the e4m3 tensor): a transpose is a permutation of bytes,
so the result is bit-identical to `.t().contiguous()` whatever the byte means (and Triton's
interpreter, CI's CPU path, handles uint8 everywhere).
"""

import torch

from ._triton import jit, kernel_for, should_use_triton, tl

# (BLOCK_R, BLOCK_C, num_warps). 128 x 128 bytes = 16 KiB a program through shared memory; other tiles
# can be passed to `transpose_bytes` (bench/bench_fp8.py `kernels` times a few beside this default).
DEFAULT_TILE = (128, 128, 8)


@jit
def _transpose_kernel(
    X, Y,  # X (R, C) uint8 with strides (stride_r, stride_c); Y (C, R) uint8 row-major
    n_rows, n_cols, stride_r, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
    if IDX64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    tile = tl.load(X + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=row_ok[:, None] & col_ok[None, :], other=0)  # (BR, BC)
    tl.store(Y + cols[:, None] * n_rows + rows[None, :], tl.trans(tile),
             mask=col_ok[:, None] & row_ok[None, :])  # (BC, BR)


def transpose_bytes_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: x (R, C) -> x^T (C, R), row-major."""
    return x.t().contiguous()


def transpose_bytes(x: torch.Tensor, *, tile: tuple[int, int, int] | None = None,
                    use_triton: bool | None = None) -> torch.Tensor:
    """x (R, C) of a one-byte dtype (float8_e4m3fn, uint8, int8, ...) -> x^T (C, R) row-major, same dtype.

    Triton on CUDA (and the interpreter), `.t().contiguous()` elsewhere; bit-identical either way.
    `tile` = (BLOCK_R, BLOCK_C, num_warps), powers of two (default `DEFAULT_TILE`).
    """
    if x.dim() != 2:
        raise ValueError(f"transpose_bytes: x must be 2-D (rows, columns), got shape {tuple(x.shape)}")
    if x.element_size() != 1:
        raise ValueError(f"transpose_bytes: x must have a one-byte dtype (e.g. float8_e4m3fn), got {x.dtype}; "
                         "use x.t().contiguous() for wider dtypes")
    if not should_use_triton(x, use_triton):
        return transpose_bytes_reference(x)
    n_rows, n_cols = x.shape
    out = torch.empty((n_cols, n_rows), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    block_r, block_c, warps = tile or DEFAULT_TILE
    src, dst = x.view(torch.uint8), out.view(torch.uint8)
    # the largest offset any lane forms (masked lanes of the last tiles too), read side and write side
    span = max((n_rows + block_r) * abs(src.stride(0)) + (n_cols + block_c) * abs(src.stride(1)),
               (n_cols + block_c) * n_rows + n_rows + block_r)
    grid = (-(-n_rows // block_r), -(-n_cols // block_c))
    kernel_for(_transpose_kernel)[grid](src, dst, n_rows, n_cols, src.stride(0), src.stride(1),
                                        BLOCK_R=block_r, BLOCK_C=block_c, IDX64=span >= 2**31, num_warps=warps)
    return out
