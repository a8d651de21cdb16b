"""RMSNorm forward/backward: y = x / rms(x) * (offset + w), in fp32, output in x's dtype.

``offset=1.0`` is Gemma's (1 + w) scale, whose weight is stored as a delta around zero. One
Triton program normalises one row in forward (the row is read once); the backward recomputes
x_hat from the saved per-row 1/rms instead of saving the normalised activations, and
accumulates dw per program over a run of rows so only (programs, D) partial sums are written,
not (rows, D).
"""

import torch

from ._triton import jit, kernel_for, next_power_of_2, num_programs_hint, should_use_triton, tl


@jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD,  # X/Y (M, D) rows with stride_x/stride_y; W (D,); RSTD (M,) fp32
    stride_x, stride_y, D, eps, offset,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * rstd * (w + offset)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,  # DY/X/DX (M, D); DW_PARTIAL (programs, D) fp32
    stride_dy, stride_x, stride_dx, M, D, offset, rows_per_program,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dy_w = dy * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g = dy * w
        dx = rstd * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / D))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch RMSNorm with the same numerics contract (fp32 math, one cast at the end)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., D)
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
        block = next_power_of_2(D)
        if M > 0:
            kernel_for(_rms_norm_forward_kernel)[(M,)](
                rows, weight, y, rstd, rows.stride(0), y.stride(0), D, eps, offset, BLOCK_D=block,
                num_warps=_num_warps(block),
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
        programs = max(1, min(M, num_programs_hint(rows.device)))
        rows_per_program = -(-M // programs) if M else 0
        dw_partial = torch.zeros((programs, D), dtype=torch.float32, device=rows.device)
        block = next_power_of_2(D)
        if M > 0:
            kernel_for(_rms_norm_backward_kernel)[(programs,)](
                dy_rows, rows, weight, rstd, dx, dw_partial, dy_rows.stride(0), rows.stride(0),
                dx.stride(0), M, D, ctx.offset, rows_per_program, BLOCK_D=block,
                num_warps=_num_warps(block),
            )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None, None


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


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
