"""Fused LoRA MLP without a gate: fc2(act(fc1(x))), the vision towers' MLP (Mllama's, Qwen2-VL's), as one autograd
node that keeps x alone.

Why: composed of two fused projections and the activation's own node, autograd keeps fc1's output for the
activation's backward and the activation's output for fc2's adapter gradient, and the backward makes two more
tensors of that width. In the snapshot of a Llama-3.2-11B-Vision QLoRA step (BENCHMARKS.md, session 17) three of
them, (12,862 positions, 5120) each, 377 MiB, were alive at the step's peak, during a tower layer's recomputed
backward. This node keeps none: forward runs the token rows in chunks of `CHUNK_TOKENS` and keeps the output alone;
backward recomputes fc1 chunk by chunk (one more fc1 product a layer, an eighth of the MLP's matmul work over forward,
recomputation and backward), so at most one chunk's (n, I) tensors exist at a time: three at most (fc1's output,
the activation's, fc2's input gradient; GELU's derivative is written over the last).

The activation runs as the tower's own module, in the compute dtype as before. Its derivative: GELU's own backward
op for transformers' GELU modules (Mllama's tower; no autograd node, no nested engine run, which cost ~120 us of host
time a call in the decoders' MLP, docs/decisions.md), autograd on the chunk for any other (Qwen2-VL's quick GELU).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .lora_linear import (
    adapter_inputs, adapters_of, autocast_off, compute_dtype, group_backward, group_forward, projection_of,
)
from .lora_mlp import dense_projections, token_chunks
from .stacked_adapters import stack_group

# Token rows per chunk: (4096, 5120) bf16 is 40 MiB for Mllama's tower (module-level so tests can shrink it). 2,048
# made 7 chunks of the 11B's 12,862 tower rows and left that step host-bound (BENCHMARKS.md, session 18).
CHUNK_TOKENS = 4096


def _chunks(n: int) -> list[slice]:
    return token_chunks(n, CHUNK_TOKENS)


def _stacks(projections, dtype: torch.dtype) -> tuple:
    """fc1's and fc2's adapters stacked and cast to `dtype` once for every chunk (else each chunk's group call casts
    them again: host calls per chunk); None for a projection without an adapter."""
    return tuple(stack_group((p,), dtype) for p in projections)


# transformers' GELU module types -> the `approximate` argument of GELU's backward op
_GELU_TYPES = {type(ACT2FN["gelu"]): "none", type(ACT2FN["gelu_pytorch_tanh"]): "tanh"}


def _gelu_approximation(act: nn.Module) -> str | None:
    """The `approximate` argument of GELU's backward op when `act` is a GELU module, else None."""
    return act.approximate if isinstance(act, nn.GELU) else _GELU_TYPES.get(type(act))


class LoraPlainMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act, fc1, fc2, value_unused, *adapters):  # x (N, H); adapters A1, B1, A2, B2 (None: none)
        ctx.act, ctx.projections = act, (fc1, fc2)  # as given: a 4-bit weight stays packed until backward
        ctx.approximate = _gelu_approximation(act)
        ctx.save_for_backward(x, *adapters)
        if value_unused:  # a recomputation: backward computes everything it needs from x
            return torch.empty_like(x)  # (N, H): the MLP maps H -> H (lora_plain_mlp checks); never read
        chunks = _chunks(x.shape[0])
        with autocast_off(x):
            dense = dense_projections((fc1, fc2), x.dtype) if len(chunks) > 1 else (fc1, fc2)
            stack1, stack2 = _stacks(dense, x.dtype)
            out = None  # (N, out)
            for rows in chunks:
                (h,), _, _ = group_forward(x[rows], dense[:1], adapters[:2], stack1)  # (n, I)
                (part,), _, _ = group_forward(act(h), dense[1:], adapters[2:], stack2)  # (n, out)
                del h
                if len(chunks) == 1:
                    out = part
                else:
                    out = part.new_empty((x.shape[0], part.shape[1])) if out is None else out
                    out[rows] = part
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *adapters = ctx.saved_tensors
        chunks = _chunks(x.shape[0])
        fc1, fc2 = dense_projections(ctx.projections, x.dtype) if len(chunks) > 1 else ctx.projections
        stack1, stack2 = _stacks((fc1, fc2), x.dtype)
        need_dx = ctx.needs_input_grad[0]
        dx = x.new_empty(x.shape) if need_dx and len(chunks) > 1 else None  # (N, H)
        totals = [None] * 4  # dA1, dB1, dA2, dB2
        with autocast_off(x):
            grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # (N, out)
            for rows in chunks:
                xr = x[rows]  # (n, H)
                (h,), fc1_layout, fc1_saved = group_forward(xr, (fc1,), adapters[:2], stack1)  # (n, I), recomputed
                with torch.enable_grad():  # records the activation only for autograd's derivative (not GELU)
                    a = ctx.act(h.requires_grad_(ctx.approximate is None))  # (n, I)
                fc2_layout, fc2_saved = adapter_inputs(a.detach(), adapters[2:], stack2)  # a A_2^T: (n, r)
                da, fc2_grads = group_backward([grad_out[rows]], a.detach(), (fc2,), fc2_layout, fc2_saved)
                del fc2_saved
                if ctx.approximate:  # GELU's derivative written over da: h and da alone are alive, not four (n, I)
                    del a
                    dh = torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
                else:
                    dh = torch.autograd.grad(a, h, da)[0]  # (n, I)
                    del a
                del h, da
                dx_rows, fc1_grads = group_backward([dh], xr, (fc1,), fc1_layout, fc1_saved, need_dx)
                del dh
                if dx_rows is not None and len(chunks) == 1:
                    dx = dx_rows
                elif dx_rows is not None:
                    dx[rows] = dx_rows
                totals = [p if t is None else (t if p is None else t.add_(p))
                          for t, p in zip(totals, [*fc1_grads, *fc2_grads])]
        return (dx, None, None, None, None, *totals)


def lora_plain_mlp(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module, act, value_unused: bool = False
                   ) -> torch.Tensor | None:  # fmt: skip
    """x (..., H) -> fc2(act(fc1(x))) (..., out) through the fused function, or None when a projection cannot fuse
    (`why_not_fused`): the caller then runs its modules. `value_unused=True` (a checkpoint's recomputation whose
    caller only differentiates the result, and an MLP mapping H -> H): the returned tensor's values are unset, its
    gradient exact, and the forward's matmuls are skipped (backward recomputes fc1 anyway)."""
    projections = [projection_of(m) for m in (fc1, fc2)]
    if any(p is None for p in projections):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, H)
    value_unused = value_unused and fc2.out_features == x.shape[-1]
    out = LoraPlainMLPFunction.apply(x2, act, *projections, value_unused, *adapters_of(projections))
    return out.view(*lead, out.shape[-1])
