"""Fused LoRA gated MLP: down(act(gate(x)) * up(x)) as one autograd node.

It saves x and the gate/up projections (N, I), plus the small LoRA tensors (the adapters' casts
and x A^T, (N, r)). The activation product h = act(g) * u, which the down projection's adapter
gradient needs, is recomputed in backward by the activation kernel itself (one cheap elementwise
pass), so neither h nor act(g) is kept; 4-bit base weights are dequantized just in time in
forward and again in backward (see lora_linear.py). gate and up share x, so their LoRA A
matrices are stacked: one matmul computes x [A_gate; A_up]^T (group_forward).

Long sequences: every step after the gate/up matmuls is independent per token, so h (forward)
and h, dh, dg, du (backward) are made `CHUNK_TOKENS` rows at a time. Without that, a 32K-token
8B layer holds four more (N, 14336) bf16 tensors (3.5 GiB) at its backward's peak; with it, the
peak of the MLP is x, g, u plus one chunk's worth. Below that length there is one chunk and the
code runs as before (the 4-bit weights are then dequantized one at a time, as a short step's
peak memory is where the 4-bit path must stay lean; with several chunks each weight is
dequantized once per backward and shared by the chunks).

Checkpoint recomputation (`value_unused`): when a checkpointed layer is re-run only to be
differentiated, the MLP's output value is dead (it only feeds the residual sum whose gradient is
already known). `LoraMLPInBackwardFunction` then saves x alone and returns an unset tensor; its
backward computes gate/up, the activation and every gradient chunk by chunk. Per layer and
micro-batch that drops the down projection's recomputed forward matmul, keeps no (N, I) tensor
between the recomputation and the backward, and dequantizes a 4-bit weight 5 times instead of 6.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from .lora_linear import (
    adapter_inputs, adapters_of, autocast_off, compute_dtype, dense_weight, group_backward, group_forward,
    projection_of, usable,
)
from ..kernels import geglu, swiglu
from ..kernels.glu import gated_activation_backward
from .fp8_matmul import fp8_weight

# transformers' activation names (ACT2FN keys) -> the gated kernel computing act(gate) * up.
GATED_ACTIVATIONS = {
    "silu": swiglu,
    "swish": swiglu,
    "gelu_pytorch_tanh": partial(geglu, approximate="tanh"),
    "gelu": partial(geglu, approximate="none"),
}

# The same activations as gated_activation_backward names them.
GATED_KINDS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_none"}

# Token rows per chunk of the per-token part of the MLP (module-level so tests can shrink it).
CHUNK_TOKENS = 4096


def token_chunks(n: int, size: int) -> list[slice]:
    """Slices of `size` rows covering n rows (the last one short)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _chunks(n: int) -> list[slice]:
    return token_chunks(n, CHUNK_TOKENS)


def _rows(saved: list[torch.Tensor], rows: slice) -> list[torch.Tensor]:
    """group_forward's saved [A stacked, x A^T (N, R), B...] for the token rows `rows`."""
    if not saved:
        return saved
    a, xa, *bs = saved
    return [a, xa[rows], *bs]


def mlp_forward(x: torch.Tensor, activation: str, projections, adapters, stacked=(None, None)):
    """x (N, H) -> (out (N, H), g, u (N, I), (gate/up layout, down layout), gate/up saved, down saved):
    the MLP's forward and what its backward needs (group_forward's saved tensors). `stacked`: the
    (gate/up, down) groups' persistent adapter buffers for no-grad calls (stacked_adapters.py)."""
    gate, up, down = projections
    act = GATED_ACTIVATIONS[activation]
    with autocast_off(x):
        (g, u), gate_up, gate_up_saved = group_forward(x, (gate, up), adapters[:4], stacked[0])  # (N, I) each
        chunks = _chunks(x.shape[0])
        if len(chunks) == 1:
            (out,), down_layout, down_saved = group_forward(act(g, u), (down,), adapters[4:], stacked[1])  # (N, H)
        else:
            (dense_down,) = dense_projections([down], x.dtype)
            out = torch.empty_like(x)  # (N, H)
            xa_parts = []
            for rows in chunks:
                (out[rows],), down_layout, down_saved = group_forward(
                    act(g[rows], u[rows]), (dense_down,), adapters[4:], stacked[1]
                )
                xa_parts.append(down_saved[1] if down_saved else None)
            del dense_down
            if down_saved:  # the chunks' h A_down^T, (N, r), as one saved tensor
                down_saved[1] = torch.cat(xa_parts)
    return out, g, u, (gate_up, down_layout), gate_up_saved, down_saved


class LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, gate, up, down, *adapters):  # x (N, H); adapters Ag, Bg, Au, Bu, Ad, Bd
        out, g, u, (gate_up, down_layout), gate_up_saved, down_saved = mlp_forward(
            x, activation, (gate, up, down), adapters)
        ctx.activation = activation
        ctx.projections = (gate, up, down)  # as given: a 4-bit weight stays packed until backward
        ctx.layouts = (gate_up, down_layout)
        ctx.n_gate_up = len(gate_up_saved)
        ctx.save_for_backward(x, g, u, *gate_up_saved, *down_saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, g, u, *saved = ctx.saved_tensors
        gate_up_saved, down_saved = saved[:ctx.n_gate_up], saved[ctx.n_gate_up:]

        def chunk(rows, gate, up):  # the forward's saved tensors, sliced to the chunk's rows
            return g[rows], u[rows], ctx.layouts, _rows(gate_up_saved, rows), _rows(down_saved, rows)

        return _backward_in_chunks(ctx, x, grad_out, chunk)


class LoraMLPInBackwardFunction(torch.autograd.Function):
    """The MLP of a layer being recomputed for its backward (see the module docstring): forward
    saves x and returns an unset (N, H) tensor; backward runs everything, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, activation, gate, up, down, *adapters):  # x (N, H)
        ctx.activation, ctx.projections = activation, (gate, up, down)
        ctx.save_for_backward(x, *adapters)  # adapters: None where a projection has none
        return torch.empty_like(x)  # (N, H), as the MLP maps H -> H; its value is never read

    @staticmethod
    def backward(ctx, grad_out):
        x, *adapters = ctx.saved_tensors
        act = GATED_ACTIVATIONS[ctx.activation]

        def chunk(rows, gate, up):  # gate/up and the adapters' inputs computed here, for the rows
            (g, u), gate_up, gate_up_saved = group_forward(x[rows], (gate, up), adapters[:4])  # (n, I) each
            down_layout, down_saved = adapter_inputs(act(g, u), adapters[4:])  # h A_down^T: (n, r)
            return g, u, (gate_up, down_layout), gate_up_saved, down_saved

        return _backward_in_chunks(ctx, x, grad_out, chunk, overwrite=True)


def _backward_in_chunks(ctx, x: torch.Tensor, grad_out: torch.Tensor, chunk, overwrite: bool = False) -> tuple:
    """Both functions' backward: per chunk of token rows, `chunk(rows, gate, up)` gives (g, u,
    layouts, gate/up saved, down saved) for those rows; dx is assembled from the chunks and the
    adapter gradients summed over them. With several chunks each 4-bit weight is dequantized once
    here instead of once per chunk. `overwrite`: g and u were computed for this backward alone (the
    recomputation), so their gradients are written over them (not over a forward's saved tensors)."""
    chunks = _chunks(x.shape[0])
    gate, up, down = dense_projections(ctx.projections, x.dtype) if len(chunks) > 1 else ctx.projections
    need_dx = ctx.needs_input_grad[0]
    dx = x.new_empty(x.shape) if need_dx and len(chunks) > 1 else None  # (N, H)
    totals: list = [None] * 6  # dAg, dBg, dAu, dBu, dAd, dBd
    with autocast_off(x):
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # (N, H)
        for rows in chunks:
            g, u, layouts, gate_up_saved, down_saved = chunk(rows, gate, up)
            dx_rows, grads = _chunk_backward(ctx.activation, grad_out[rows], x[rows], g, u, (gate, up, down),
                                             layouts, gate_up_saved, down_saved, need_dx, overwrite)
            del g, u, gate_up_saved, down_saved
            if dx_rows is not None and len(chunks) == 1:
                dx = dx_rows
            elif dx_rows is not None:
                dx[rows] = dx_rows
            totals = [p if t is None else (t if p is None else t.add_(p)) for t, p in zip(totals, grads)]
    return (dx, None, None, None, None, *totals)


def dense_projections(projections, dtype: torch.dtype) -> list:
    """The projections with their weights dense in `dtype` (4-bit ones dequantized once here); an
    FP8-computed projection gets its e4m3 values and row scales (NF4 converted once here)."""
    out = []
    for p in projections:
        if p.fp8:
            values, scale = fp8_weight(p)  # (out, in) e4m3, (out,)
            out.append(dataclasses.replace(p, weight=values, weight_scale=scale))
        else:
            out.append(dataclasses.replace(p, weight=dense_weight(p.weight, dtype, p.weight_scale), weight_scale=None))
    return out


def _chunk_backward(activation, grad_out, x, g, u, projections, layouts, gate_up_saved, down_saved, need_dx,
                    overwrite=False):
    """Gradients of one chunk of token rows: grad_out (n, H), x (n, H), g/u (n, I) -> (dx (n, H)
    or None, [dAg, dBg, dAu, dBu, dAd, dBd] in the adapters' dtypes, None where no adapter)."""
    gate, up, down = projections
    gate_up, down_layout = layouts
    with torch.no_grad():
        h = GATED_ACTIVATIONS[activation](g, u)  # (n, I)
    dh, down_grads = group_backward([grad_out], h, (down,), down_layout, down_saved)
    del h
    # the activation's backward kernel called directly: no autograd node, no nested engine run (host time)
    overwrite = overwrite and g.is_contiguous() and u.is_contiguous()
    dg, du = gated_activation_backward(g, u, dh, GATED_KINDS[activation], overwrite=overwrite)  # (n, I) each
    del dh
    dx, gate_up_grads = group_backward([dg, du], x, (gate, up), gate_up, gate_up_saved, need_dx)
    return dx, [*gate_up_grads, *down_grads]


def lora_mlp(
    x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str, value_unused: bool = False,
    projections=None, gemv_rows: int = 0, prenorm: nn.Module | None = None, residual: torch.Tensor | None = None,
    stacked=None,
) -> torch.Tensor | None:
    """x (..., H) -> (..., H) through the fused function, or None when it cannot run (an
    activation without a gated kernel, or a projection `why_not_fused` rejects): the caller
    then runs its plain modules. `value_unused=True` (a checkpoint's recomputation, where the
    result is only differentiated): the returned tensor's values are unset, its gradient exact.
    `projections`: the three modules' fused views when the caller has them (plan.LayerPlan).
    `gemv_rows` (the plan's): up to this many rows without autograd, the decode GEMV kernels run
    it (decode_linear.py: gate/up one launch with the activation in its epilogue). `prenorm`: an
    RMSNorm module to apply to x first (decode steps hand it over to the GEMV); without the fused
    path it must run here, before the plain modules too. `residual` (..., H): the result is
    residual + the MLP's output (a decode step adds it in the down GEMV's epilogue). `stacked`: the
    (gate/up, down) groups' adapters in generation's persistent buffers (stacked_adapters.py), read
    instead of the adapters by calls without autograd."""
    if projections is None:
        projections = [projection_of(m) for m in (gate, up, down)]
    if activation not in GATED_ACTIVATIONS or any(p is None for p in projections):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, H)
    stacked = (None, None) if stacked is None else (usable(stacked[0], x2), usable(stacked[1], x2))
    if gemv_rows or prenorm is not None:
        from . import decode_linear

        if gemv_rows and decode_linear.applies(x2, gemv_rows):
            res2 = None if residual is None else residual.reshape(-1, residual.shape[-1])
            out = decode_linear.decode_mlp(x2, tuple(projections), activation, prenorm, res2, stacked)
            if out is not None:
                return out.view(*lead, out.shape[-1])
        if prenorm is not None:
            x2 = decode_linear.normalized(x2, prenorm)
    if stacked != (None, None):  # no autograd: the forward alone, on the persistent buffers
        out = mlp_forward(x2, activation, tuple(projections), adapters_of(projections), stacked)[0]
    else:
        function = LoraMLPInBackwardFunction if value_unused and torch.is_grad_enabled() else LoraMLPFunction
        out = function.apply(x2, activation, *projections, *adapters_of(projections))
    out = out.view(*lead, out.shape[-1])
    return out if residual is None else residual + out
