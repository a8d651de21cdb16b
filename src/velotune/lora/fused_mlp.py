"""Fused LoRA gated MLP: down(act(gate(x)) * up(x)) as one autograd node.

It saves x and the gate/up projections (N, I), plus the small LoRA tensors (the adapters' casts
and x A^T, (N, r)). The activation product h = act(g) * u, which the down projection's adapter
gradient needs, is recomputed in backward by the activation kernel itself (one cheap elementwise
pass), so neither h nor act(g) is kept; 4-bit base weights are dequantized just in time in
forward and again in backward (see fused_linear.py). gate and up share x, so their LoRA A
matrices are stacked: one matmul computes x [A_gate; A_up]^T (group_forward).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .fused_linear import adapters_of, compute_dtype, group_backward, group_forward, projection_of
from .fused_ops import geglu, swiglu

# transformers' activation names (ACT2FN keys) -> the gated kernel computing act(gate) * up.
GATED_ACTIVATIONS = {
    "silu": swiglu,
    "swish": swiglu,
    "gelu_pytorch_tanh": partial(geglu, approximate="tanh"),
    "gelu": partial(geglu, approximate="none"),
}


class LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, gate, up, down, *adapters):  # x (N, H); adapters Ag, Bg, Au, Bu, Ad, Bd
        act = GATED_ACTIVATIONS[activation]
        with torch.autocast(x.device.type, enabled=False):
            (g, u), gate_up, gate_up_saved = group_forward(x, (gate, up), adapters[:4])  # (N, I) each
            h = act(g, u)  # (N, I)
            (out,), down_layout, down_saved = group_forward(h, (down,), adapters[4:])  # (N, H)
            del h
        ctx.activation = activation
        ctx.projections = (gate, up, down)
        ctx.layouts = (gate_up, down_layout)
        ctx.n_gate_up = len(gate_up_saved)
        ctx.save_for_backward(x, g, u, *gate_up_saved, *down_saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, g, u, *saved = ctx.saved_tensors
        gate_up_saved, down_saved = saved[:ctx.n_gate_up], saved[ctx.n_gate_up:]
        gate, up, down = ctx.projections
        gate_up, down_layout = ctx.layouts
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                g_leaf, u_leaf = g.detach().requires_grad_(), u.detach().requires_grad_()
                h = GATED_ACTIVATIONS[ctx.activation](g_leaf, u_leaf)  # (N, I)
            grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # (N, H)
            dh, (dAd, dBd) = group_backward([grad_out], h.detach(), (down,), down_layout, down_saved)
            dg, du = torch.autograd.grad(h, (g_leaf, u_leaf), dh)
            del h, g_leaf, u_leaf, dh
            dx, (dAg, dBg, dAu, dBu) = group_backward(
                [dg, du], x, (gate, up), gate_up, gate_up_saved, ctx.needs_input_grad[0]
            )
        return (dx, None, None, None, None, dAg, dBg, dAu, dBu, dAd, dBd)


def lora_mlp(
    x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str
) -> torch.Tensor | None:
    """x (..., H) -> (..., H) through the fused function, or None when it cannot run (an
    activation without a gated kernel, or a projection `why_not_fused` rejects): the caller
    then runs its plain modules."""
    projections = [projection_of(m) for m in (gate, up, down)]
    if activation not in GATED_ACTIVATIONS or any(p is None for p in projections):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, H)
    out = LoraMLPFunction.apply(x2, activation, *projections, *adapters_of(projections))
    return out.view(*lead, out.shape[-1])
