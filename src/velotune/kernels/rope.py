"""Rotate-half rotary embedding on q and k, forward/backward, in place on the Triton path.

Layout and semantics are those of ``rope_reference`` below (the models' own rotation, which
``velotune.models`` imports from here): q (B, Hq, T, Dh) and
k (B, Hk, T, Dh) (any strides with unit stride along Dh, e.g. the transposed view of a
projection), cos/sin (B, T, R) (B may be 1) with the two halves of the last dim duplicated, as
``RotaryEmbedding`` returns them (Llama 3 / YaRN / linear scaling already folded in). The first R
features are rotated, the rest pass through (partial rotary, Phi-3 and others).

In place: rotating needs nothing of the input for backward (only cos/sin), so the Triton path
overwrites q and k and marks them dirty for autograd instead of allocating new (B, H, T, Dh)
tensors. It falls back to new outputs when q or k is a leaf that requires grad (autograd forbids
writing into those), when Dh is not unit-stride, or with ``inplace=False``. Callers that still
need the unrotated q/k must pass ``inplace=False`` (or a copy). cos/sin are constants here: the
Triton path returns no gradient for them, so tensors that require grad go to the reference.
"""

import torch

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl


@jit
def _rope_kernel(
    X, Y, COS, SIN,  # X/Y (B, H, T, Dh) with the given strides (unit along Dh); COS/SIN (B|1, T, R)
    sx_b, sx_h, sx_t, sy_b, sy_h, sy_t, sc_b, sc_t, ss_b, ss_t,
    T, H, HALF,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    r = tl.arange(0, BLOCK_R)
    r_mask = r < HALF
    c1 = tl.load(COS + b * sc_b + t * sc_t + r, mask=r_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + b * sc_b + t * sc_t + HALF + r, mask=r_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + b * ss_b + t * ss_t + r, mask=r_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + b * ss_b + t * ss_t + HALF + r, mask=r_mask, other=0.0).to(tl.float32)
    # forward:  y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2  (x*cos + rotate_half(x)*sin)
    # backward: the transpose, g1*c1 + g2*s2 and g2*c2 - g1*s1
    if BACKWARD:
        cross1 = s2
        cross2 = -s1
    else:
        cross1 = -s1
        cross2 = s2
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None] & r_mask[None, :]  # (BLOCK_H, BLOCK_R)
        x_row = X + b * sx_b + t * sx_t + h[:, None] * sx_h + r[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] + x2 * cross1[None, :]
        y2 = x2 * c2[None, :] + x1 * cross2[None, :]
        y_row = Y + b * sy_b + t * sy_t + h[:, None] * sy_h + r[None, :]
        tl.store(y_row, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x (B, H, T, D); the rest pass (partial rotary).

    The models' plain-path rotation (velotune.models imports it from here, so the kernel and the
    model share one reference and the kernels package needs nothing above it)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D_rot)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the model's own rotation (same ops, same dtype steps), out of place."""
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


def _rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Launch the kernel: rotate the first R features of x (B, H, T, Dh) into out (same shape)."""
    B, H, T, _ = x.shape
    half = cos.shape[-1] // 2
    if B * T == 0 or H == 0:
        return
    block_r = next_power_of_2(half)
    block_h = max(1, min(next_power_of_2(H), 4096 // block_r))
    kernel_for(_rope_kernel)[(B * T,)](
        x, out, cos, sin,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        T, H, half, BLOCK_H=block_h, BLOCK_R=block_r, BACKWARD=backward,
    )  # fmt: skip


def _rotated_copy(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Out-of-place rotation: a new (B, H, T, Dh) tensor; pass-through features copied."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous (B, H, T, Dh)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    _rotate(x if x.stride(-1) == 1 else x.contiguous(), out, cos, sin, backward)
    return out


class RoPEFunction(torch.autograd.Function):
    """Triton RoPE on one of q/k; in place (marked dirty) when ``inplace``, saving only cos/sin.

    One tensor per call: autograd allows an in-place Function on a view (q and k are views of
    the projections) only when it returns a single tensor.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, inplace: bool):
        ctx.save_for_backward(cos, sin)
        if inplace:
            _rotate(x, x, cos, sin, backward=False)
            ctx.mark_dirty(x)
            return x
        return _rotated_copy(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotated_copy(dy, cos, sin, backward=True), None, None, None


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, H, T, Dh), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, Dh = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != Dh:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and Dh")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T:
        raise ValueError(
            f"apply_rope: cos/sin must both be (B, T, R) = ({B}, {T}, R) (B may be 1), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    R = cos.shape[-1]
    if R % 2 or R > Dh or R == 0:
        raise ValueError(f"apply_rope: rotary dim R={R} must be even and in 2..Dh={Dh}")


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    inplace: bool = True,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (B, Hq, T, Dh) and k (B, Hk, T, Dh) with cos/sin (B, T, R); returns (q, k).

    Triton path: q and k are rotated in place when autograd allows (see the module docstring).
    """
    _check_shapes(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad or not should_use_triton(q, use_triton):
        return apply_rope_reference(q, k, cos, sin)
    cos = cos.expand(q.shape[0], -1, -1)  # (B, T, R), stride 0 over B when shared
    sin = sin.expand(q.shape[0], -1, -1)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    outputs = []
    for x in (q, k):
        leaf_needs_grad = x.is_leaf and x.requires_grad and torch.is_grad_enabled()
        can_write = inplace and x.stride(-1) == 1 and not leaf_needs_grad
        outputs.append(RoPEFunction.apply(x, cos, sin, can_write))
    return outputs[0], outputs[1]
