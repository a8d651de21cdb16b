"""Fused LoRA gated MLP: down(act(gate(x)) * up(x)) as one autograd node.

It saves x and the gate/up projections (N, I) only. The activation product h = act(g) * u, which
the down projection's adapter gradient needs, is recomputed in backward by the activation
kernel itself (one cheap elementwise pass), so neither h nor act(g) is kept; 4-bit base weights
are dequantized just in time in forward and again in backward (see fused_linear.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .fused_linear import adapters_of, compute_dtype, project, project_backward, projection_of
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
            g = project(x, gate, adapters[0], adapters[1])  # (N, I)
            u = project(x, up, adapters[2], adapters[3])  # (N, I)
            out = project(act(g, u), down, adapters[4], adapters[5])  # (N, H)
        ctx.activation = activation
        ctx.projections = (gate, up, down)
        ctx.save_for_backward(x, g, u, *adapters)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, g, u, *adapters = ctx.saved_tensors
        gate, up, down = ctx.projections
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                g_leaf, u_leaf = g.detach().requires_grad_(), u.detach().requires_grad_()
                h = GATED_ACTIVATIONS[ctx.activation](g_leaf, u_leaf)  # (N, I)
            grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
            dh, dAd, dBd = project_backward(grad_out, h.detach(), down, adapters[4], adapters[5])
            dg, du = torch.autograd.grad(h, (g_leaf, u_leaf), dh)
            del h, g_leaf, u_leaf
            need_dx = ctx.needs_input_grad[0]
            dx, dAg, dBg = project_backward(dg, x, gate, adapters[0], adapters[1], need_dx)
            dx_up, dAu, dBu = project_backward(du, x, up, adapters[2], adapters[3], need_dx)
            if dx is not None:
                dx.add_(dx_up)
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
