"""RMSNorm forward/backward: y = x / rms(x) * (offset + w), in fp32, output in x's dtype.

``offset=1.0`` is Gemma's (1 + w) scale, whose weight is stored as a delta around zero. Each
Triton program normalises a tile of BLOCK_M rows in forward (one row for D >= 4096; many for the
per-head q/k norms of Qwen3/Gemma 3, D = 128, where one row per program would leave the GPU
idle); the backward recomputes x_hat from the saved per-row 1/rms instead of saving the
normalised activations, and accumulates dw per program over a run of tiles so only
(programs, D) partial sums are written, not (rows, D).
"""

import torch

from ._triton import jit, kernel_for, next_power_of_2, num_programs_hint, should_use_triton, tl

_TILE_ELEMENTS = 4096  # rows per tile = max(1, this // padded D)


@jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD,  # X/Y (M, D) rows with stride_x/stride_y; W (D,); RSTD (M,) fp32
    stride_x, stride_y, M, D, eps, offset,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < D)[None, :]  # (BLOCK_M, BLOCK_D)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_M,)
    y = x * rstd[:, None] * (w + offset)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,  # DY/X/DX (M, D); DW_PARTIAL (programs, D) fp32
    stride_dy, stride_x, stride_dx, M, D, offset, tiles_per_program,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid.to(tl.int64) * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,); tiles past M are fully masked
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        dy_w = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g = dy * w, per row
        dx = rstd[:, None] * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=1) / D)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=col_mask)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *, cast_before_scale: bool = False
) -> torch.Tensor:
    """The one plain PyTorch RMSNorm: the CPU path of `rms_norm`, the models' plain path, the
    fast path's fallback. x / rms(x) is always computed in fp32; then

    * ``cast_before_scale=False`` (the kernel's contract, Gemma's norm in transformers): scaled by
      (offset + w) in fp32, one cast to x's dtype at the end;
    * ``cast_before_scale=True`` (transformers' Llama norm, shared by Mistral, Qwen2/3, Phi-3):
      cast back to x's dtype first, then multiplied by (offset + w) in w's dtype, so the result has
      the promoted dtype (an fp32 norm weight on bf16 activations gives fp32). Bit for bit what
      transformers computes, which matters in bf16.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., D)
    if cast_before_scale:
        return (weight if offset == 0 else offset + weight) * h.to(x.dtype)
    return (h * (offset + weight.float())).to(x.dtype)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit stride along D (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm; saves x and the per-row 1/rms (M floats), not the normalised output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
        rows = _as_rows(x)  # (M, D)
        weight = weight.contiguous()  # (D,)
        M, D = rows.shape
        y = torch.empty((M, D), dtype=x.dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_m, block_d = _tile(M, D)
        if M > 0:
            kernel_for(_rms_norm_forward_kernel)[(-(-M // block_m),)](
                rows, weight, y, rstd, rows.stride(0), y.stride(0), M, D, eps, offset,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_num_warps(block_m * block_d),
            )  # fmt: skip
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset = offset
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        M, D = rows.shape
        dy_rows = _as_rows(dy)  # (M, D)
        dx = torch.empty_like(rows)
        block_m, block_d = _tile(M, D)
        tiles = -(-M // block_m)
        programs = max(1, min(tiles, num_programs_hint(rows.device)))
        tiles_per_program = -(-tiles // programs)
        dw_partial = torch.zeros((programs, D), dtype=torch.float32, device=rows.device)
        if M > 0:
            kernel_for(_rms_norm_backward_kernel)[(programs,)](
                dy_rows, rows, weight, rstd, dx, dw_partial, dy_rows.stride(0), rows.stride(0),
                dx.stride(0), M, D, ctx.offset, tiles_per_program, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=_num_warps(block_m * block_d),
            )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None, None


def _tile(M: int, D: int) -> tuple[int, int]:
    """(rows per tile, padded D): about _TILE_ELEMENTS values per tile, never more rows than exist."""
    block_d = next_power_of_2(D)
    return max(1, min(_TILE_ELEMENTS // block_d, next_power_of_2(M))), block_d


def _num_warps(elements: int) -> int:
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *, use_triton: bool | None = None
) -> torch.Tensor:
    """RMSNorm of x (..., D) with weight (D,): Triton on CUDA (or the interpreter), else the reference."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if not should_use_triton(x, use_triton):
        return rms_norm_reference(x, weight, eps, offset)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))
