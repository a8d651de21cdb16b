"""Fused linear + cross-entropy: the LM-head loss without ever holding (N, V) logits.

Why: at Llama-3 sizes (V = 128256) the fp32 logits of 16k tokens are 8 GiB, more than the rest
of a QLoRA step. Here the tokens go through in chunks; per chunk the logits are one matmul in the
input dtype, a Triton kernel computes the fp32 log-sum-exp and token losses and overwrites the
logits in place with d loss / d logits = (softmax - onehot) * scale (Gemma 2's soft-capping
included), and two more matmuls turn that into the chunk's d hidden (and accumulate d weight /
d bias when those are trained). The gradients are therefore finished in the forward pass and kept
for backward, which only multiplies them by grad_output. Peak extra memory: one chunk of logits.

Loss = sum of token losses / (num_items_in_batch if given, else the count of non-ignored labels);
``reduction="sum"`` skips the division. Labels are already shifted by the caller.
"""

import torch
import torch.nn.functional as F

from ._online_lse import online_logsumexp, store_softmax_grad, transformed_logits
from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl

IGNORE_INDEX = -100  # labels never scored (transformers' convention); velotune.models.loss uses this one


@jit
def _cross_entropy_chunk_kernel(
    LOGITS, LABELS, LOSS, SCALE,  # LOGITS (n, V) rows of stride_l, overwritten by d loss/d logits
    stride_l, V, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                tl.store(base + offs, tl.zeros((BLOCK_V,), dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=offs < V)
    else:
        # pass 1: fp32 log-sum-exp of the (soft-capped) row; no temperature in a training loss
        lse = online_logsumexp(base, V, 1.0, softcap, HAS_SOFTCAP, False, True, BLOCK_V)
        z_label, _ = transformed_logits(tl.load(base + label), 1.0, softcap, HAS_SOFTCAP, False)
        tl.store(LOSS + row, lse - z_label)
        if COMPUTE_GRAD:
            # pass 2: (softmax - onehot) * scale, times d(softcap)/dz = 1 - tanh^2, in place
            scale = tl.load(SCALE).to(tl.float32)
            store_softmax_grad(base, V, label, lse, scale, 1.0, softcap, HAS_SOFTCAP, False, False, BLOCK_V)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch with full logits: matmul in the input dtype, cross-entropy in fp32."""
    _check(hidden, weight, labels, reduction, bias, softcap)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), bias).float()  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / _denominator(labels, ignore_index, num_items_in_batch)


def _denominator(labels: torch.Tensor, ignore_index: int, num_items_in_batch) -> torch.Tensor:
    """num_items_in_batch, else the count of non-ignored labels, as an fp32 tensor (no host sync)."""
    if num_items_in_batch is None:
        return (labels != ignore_index).sum().float()
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=labels.device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), device=labels.device)


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of logits is about as large as the hidden states."""
    return max(1, min(next_power_of_2(-(-n_tokens // -(-vocab_size // hidden_size))), next_power_of_2(n_tokens)))


def _chunked_loss_and_grads(
    hidden, weight, labels, bias, ignore_index, softcap, scale, chunk_size, need_dh, need_dw, need_db
):
    """Sum of token losses (fp32 scalar) and, as asked, d hidden (N, H), d weight (V, H), d bias (V,)."""
    N, H = hidden.shape
    V = weight.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # (V, H)
    b = None if bias is None else bias.to(hidden.dtype)
    compute_grad = need_dh or need_dw or need_db
    token_loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(w) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_db else None
    block_v = min(next_power_of_2(V), 4096)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]  # (n, H)
        logits = F.linear(h, w, b).contiguous()  # (n, V), input dtype
        kernel_for(_cross_entropy_chunk_kernel)[(end - start,)](
            logits, labels[start:end], token_loss[start:end], scale, logits.stride(0), V, ignore_index,
            float(softcap or 0.0), HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
            num_warps=8 if hidden.is_cuda else 1,
        )  # fmt: skip
        # logits now hold d loss / d logits (n, V)
        if need_dh:
            torch.mm(logits, w, out=dh[start:end])  # (n, H)
        if need_dw:
            dw.addmm_(logits.t(), h)  # (V, H), accumulated in the compute dtype
        if need_db:
            db += logits.float().sum(0)
        del logits
    return token_loss.sum(), dh, dw, db


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss in forward with its gradients precomputed; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, num_items_in_batch, reduction, chunk_size):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            scale = _scale(labels, ignore_index, num_items_in_batch, reduction)  # (1,) fp32
            need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            total, dh, dw, db = _chunked_loss_and_grads(
                hidden, weight, labels, bias, ignore_index, softcap, scale, chunk_size, need_dh, need_dw, need_db
            )
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale[0]

    @staticmethod
    def backward(ctx, grad_output):
        dh, dw, db = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        if dh is not None:
            dh = dh.mul_(grad_output.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_output.to(dw.dtype)).to(weight_dtype)
        if db is not None:
            db = (db * grad_output).to(bias_dtype)
        return dh, dw, db, None, None, None, None, None, None


def _scale(labels, ignore_index, num_items_in_batch, reduction) -> torch.Tensor:
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    return (1.0 / _denominator(labels, ignore_index, num_items_in_batch)).reshape(1)


def _check(hidden, weight, labels, reduction, bias, softcap) -> None:
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(
            f"fused_linear_cross_entropy: weight must be (V, {H}) for hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if labels.numel() != hidden.numel() // max(H, 1) or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (already shifted)"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fused_linear_cross_entropy: softcap must be a positive float or None, got {softcap!r}")


def _check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Out-of-range labels would read outside a row; one host sync, worth it for the clear error."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"fused_linear_cross_entropy: label {int(labels[first])} at position {first} is outside "
            f"[0, {vocab_size}) and is not ignore_index={ignore_index}"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of (hidden (N, H) @ weight (V, H).T + bias) against labels (N,), a scalar.

    hidden may also be (..., H) with labels (...). Triton path: never more than ``chunk_size``
    rows of logits at once (default: ``default_chunk_size``).
    """
    _check(hidden, weight, labels, reduction, bias, softcap)
    if not should_use_triton(hidden, use_triton):
        return fused_linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
            num_items_in_batch=num_items_in_batch, reduction=reduction, bias=bias,
        )  # fmt: skip
    H, V = hidden.shape[-1], weight.shape[0]
    flat_hidden = hidden.reshape(-1, H)  # (N, H)
    flat_labels = labels.reshape(-1).contiguous()  # (N,)
    _check_label_range(flat_labels, V, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], H, V)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if flat_hidden.stride(-1) != 1:
        flat_hidden = flat_hidden.contiguous()
    if not torch.is_grad_enabled():  # evaluation: the loss only, no gradient work at all
        scale = _scale(flat_labels, ignore_index, num_items_in_batch, reduction)
        total, _, _, _ = _chunked_loss_and_grads(
            flat_hidden, weight, flat_labels, bias, ignore_index, softcap, scale, chunk_size, False, False, False
        )
        return total * scale[0]
    return FusedLinearCrossEntropyFunction.apply(
        flat_hidden, weight, bias, flat_labels, ignore_index, softcap, num_items_in_batch, reduction, chunk_size
    )
