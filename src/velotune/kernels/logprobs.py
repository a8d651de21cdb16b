"""Per-token log-probabilities of given ids, chunked over tokens (GRPO / preference losses).

log p(id_t) = z_t[id_t] / temperature - logsumexp(z_t / temperature), z_t = hidden_t @ weight.T.
Only ``chunk_size`` rows of logits exist at once; forward keeps one fp32 log-sum-exp per token,
and backward recomputes each chunk's logits (one matmul) and lets the kernel overwrite them with
d logp / d z = g * (onehot - softmax) / temperature before the two gradient matmuls. Unlike the
cross-entropy, the upstream gradient is per token and only known in backward, so the gradients
cannot be finished in the forward pass.
"""

import torch
import torch.nn.functional as F

from ._online_lse import online_logsumexp, store_softmax_grad, transformed_logits
from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl
from .cross_entropy import default_chunk_size


@jit
def _logprobs_chunk_kernel(
    LOGITS, IDS, LSE, LOGP, GRAD,  # LOGITS (n, V) rows of stride_l; LSE/LOGP/GRAD (n,) fp32
    stride_l, V, inv_temperature,
    BACKWARD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    token = tl.load(IDS + row).to(tl.int64)
    if BACKWARD:
        # d logp / d z = g / T * (onehot - softmax), in place
        lse = tl.load(LSE + row)
        g = tl.load(GRAD + row) * inv_temperature
        store_softmax_grad(base, V, token, lse, g, inv_temperature, 0.0, False, True, True, BLOCK_V)
    else:
        lse = online_logsumexp(base, V, inv_temperature, 0.0, False, True, False, BLOCK_V)
        tl.store(LSE + row, lse)
        logp_ptr = LOGP + row  # address before the load: the instruction order of the hand-written kernel
        z_token, _ = transformed_logits(tl.load(base + token), inv_temperature, 0.0, False, True)
        tl.store(logp_ptr, z_token - lse)


def chunked_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Plain PyTorch with full logits: matmul in the input dtype, log-softmax in fp32."""
    logits = F.linear(hidden, weight.to(hidden.dtype)).float() / temperature  # (B, T, V)
    return logits.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


def _launch(logits, ids, lse, logp, grad, inv_temperature, backward):
    V = logits.shape[1]
    kernel_for(_logprobs_chunk_kernel)[(logits.shape[0],)](
        logits, ids, lse, logp, grad, logits.stride(0), V, inv_temperature, BACKWARD=backward,
        BLOCK_V=min(next_power_of_2(V), 4096), num_warps=8 if logits.is_cuda else 1,
    )  # fmt: skip


class ChunkedLogprobsFunction(torch.autograd.Function):
    """Saves hidden, ids and one fp32 log-sum-exp per token; logits are recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk_size):
        N = hidden.shape[0]
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # (V, H)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                logits = (hidden[start:end] @ w.t()).contiguous()  # (n, V)
                _launch(
                    logits, ids[start:end], lse[start:end], logp[start:end], logp[start:end], 1.0 / temperature, False
                )
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, ids, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # (V, H)
        grad_logp = grad_logp.float().contiguous()  # (N,)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(w) if need_dw else None
        N = hidden.shape[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, N, ctx.chunk_size):
                end = min(start + ctx.chunk_size, N)
                h = hidden[start:end]  # (n, H)
                logits = (h @ w.t()).contiguous()  # (n, V)
                _launch(
                    logits,
                    ids[start:end],
                    lse[start:end],
                    lse[start:end],
                    grad_logp[start:end],
                    1.0 / ctx.temperature,
                    True,
                )
                if need_dh:
                    torch.mm(logits, w, out=dh[start:end])  # (n, H)
                if need_dw:
                    dw.addmm_(logits.t(), h)  # (V, H)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """log p(token_ids) under softmax(hidden (B, T, H) @ weight (V, H).T / temperature): (B, T) fp32."""
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(
            f"chunked_logprobs: weight must be (V, {H}) for hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"chunked_logprobs: token_ids {tuple(token_ids.shape)} must be hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if not temperature > 0:
        raise ValueError(f"chunked_logprobs: temperature must be > 0, got {temperature!r}")
    bad = (token_ids < 0) | (token_ids >= V)
    if bool(bad.any()):  # one host sync, for an error that names the position
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"chunked_logprobs: token id {int(token_ids[where])} at {where} is outside [0, {V})")
    if not should_use_triton(hidden, use_triton):
        return chunked_logprobs_reference(hidden, weight, token_ids, temperature=temperature)
    flat = hidden.reshape(-1, H)  # (N, H)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    ids = token_ids.reshape(-1).contiguous()  # (N,)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat.shape[0], H, V)
    if chunk_size < 1:
        raise ValueError(f"chunked_logprobs: chunk_size must be >= 1, got {chunk_size}")
    logp = ChunkedLogprobsFunction.apply(flat, weight, ids, float(temperature), chunk_size)  # (N,)
    return logp.view(token_ids.shape)
