"""Fused LoRA projections: y = x W^T + b + s * (x A^T) B^T with a hand-written backward.

Why: PEFT's LoRA layer runs the frozen base layer and the adapter as separate modules, so
autograd keeps the input once per branch, the adapter's (N, r) intermediate, and (for 4-bit
bases) bitsandbytes' own saved state. Here several projections that read the same input (q, k,
v; or o alone) are one autograd node that saves only that input and the adapter weights;
4-bit base weights are dequantized just in time in forward and again in backward, never kept.
The base weight and bias are frozen (no gradient); the adapters get dA and dB.

Matmuls are plain torch (cuBLAS); the computation dtype is the input's (or autocast's), and the
adapter gradients are returned in the adapters' own dtype (PEFT keeps them in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fused_ops import dequantize_nf4_weight


@dataclass(frozen=True, eq=False)
class LoraProjection:
    """One projection as the fused functions see it (the adapter tensors travel separately, as
    autograd inputs; `lora_A`/`lora_B` here are None when the projection has no active adapter)."""

    weight: torch.Tensor  # (out, in) dense, or a bitsandbytes Params4bit (packed NF4)
    bias: torch.Tensor | None  # (out,) frozen base bias
    lora_A: torch.Tensor | None  # (r, in)
    lora_B: torch.Tensor | None  # (out, r)
    scaling: float


def _is_4bit(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None and type(weight).__name__ == "Params4bit"


def _is_base_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Linear4bit" and _is_4bit(getattr(module, "weight", None))
    )


def why_not_fused(module: nn.Module) -> str | None:
    """None when `module` can run through the fused functions, else the reason it cannot."""
    if _is_base_linear(module):
        if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
            return "its base weight or bias is trained (the fused path trains adapters only)"
        return None
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A"):
        return f"it is a {type(module).__name__}, not a Linear/Linear4bit or PEFT LoRA layer over one"
    if not _is_base_linear(base):
        return f"its base layer is a {type(base).__name__} (only Linear and bitsandbytes Linear4bit fuse)"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "its base weight or bias is trained (bias='all'/'lora_only' or a trainable base)"
    if module.disable_adapters or module.merged:
        return None  # the base layer alone computes the output
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        return f"{len(active)} adapters are active at once ({active}); the fused path runs one"
    if not active:
        return None
    name = active[0]
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return f"lora_dropout={module.lora_dropout[name].p} (the fused path needs lora_dropout=0)"
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return "it uses a LoRA variant (DoRA or similar) the fused path does not implement"
    if module.lora_B[name].bias is not None:
        return "its adapter has a bias (lora_bias=True)"
    return None


def projection_of(module: nn.Module) -> LoraProjection | None:
    """The fused view of a projection module, or None when it must run as a module call."""
    if why_not_fused(module) is not None:
        return None
    if _is_base_linear(module):
        return LoraProjection(module.weight, module.bias, None, None, 0.0)
    base = module.base_layer
    active = [] if module.disable_adapters or module.merged else [
        name for name in module.active_adapters if name in module.lora_A
    ]
    if not active:
        return LoraProjection(base.weight, base.bias, None, None, 0.0)
    name = active[0]
    return LoraProjection(
        base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])
    )


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight in `dtype`; a 4-bit weight is dequantized here, so callers drop it after use."""
    if _is_4bit(weight):
        return dequantize_nf4_weight(weight).to(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def project(x: torch.Tensor, p: LoraProjection, A: torch.Tensor | None, B: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) -> (N, out) = x W^T + b + s (x A^T) B^T, in x's dtype."""
    y = x @ dense_weight(p.weight, x.dtype).t()  # (N, out)
    if p.bias is not None:
        y = y + p.bias.to(x.dtype)
    if A is not None:
        xa = x @ A.to(x.dtype).t()  # (N, r)
        y = y.addmm_(xa, B.to(x.dtype).t(), alpha=p.scaling)
    return y


def project_backward(
    grad: torch.Tensor,  # (N, out)
    x: torch.Tensor,  # (N, in)
    p: LoraProjection,
    A: torch.Tensor | None,  # (r, in)
    B: torch.Tensor | None,  # (out, r)
    need_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB) of `project`; dA/dB in the adapters' dtype, None without an adapter; dx None
    when not needed (layer 0's attention input, with frozen embeddings)."""
    dx = grad @ dense_weight(p.weight, grad.dtype) if need_dx else None  # (N, in)
    if A is None:
        return dx, None, None
    a, b = A.to(grad.dtype), B.to(grad.dtype)
    gb = grad @ b  # (N, r)
    if dx is not None:
        dx.addmm_(gb, a, alpha=p.scaling)
    dA = (gb.t() @ x).mul_(p.scaling)  # (r, in)
    dB = (grad.t() @ (x @ a.t())).mul_(p.scaling)  # (out, r)
    return dx, dA.to(A.dtype), dB.to(B.dtype)


def adapters_of(projections) -> list[torch.Tensor | None]:
    """[A0, B0, A1, B1, ...]: the autograd inputs the fused functions take after x."""
    return [t for p in projections for t in (p.lora_A, p.lora_B)]


class LoraProjectionsFunction(torch.autograd.Function):
    """Several LoRA projections of one input (q/k/v, or o alone): one node that saves x once."""

    @staticmethod
    def forward(ctx, x, projections, *adapters):  # x (N, in); adapters A0, B0, A1, B1, ...
        with torch.autocast(x.device.type, enabled=False):
            outs = tuple(project(x, p, A, B) for p, A, B in zip(projections, adapters[0::2], adapters[1::2]))
        ctx.projections = projections
        ctx.save_for_backward(x, *adapters)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, *adapters = ctx.saved_tensors
        dx = None
        adapter_grads: list[torch.Tensor | None] = []
        with torch.autocast(x.device.type, enabled=False):
            for p, A, B, g in zip(ctx.projections, adapters[0::2], adapters[1::2], grads):
                g = g.reshape(-1, g.shape[-1]).to(x.dtype)
                dx_i, dA, dB = project_backward(g, x, p, A, B, need_dx=ctx.needs_input_grad[0])
                if dx_i is not None:
                    dx = dx_i if dx is None else dx.add_(dx_i)
                adapter_grads += [dA, dB]
        return (dx, None, *adapter_grads)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def lora_projections(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """x (..., in) through each module -> [(..., out_i)], fused when every module allows it,
    otherwise the modules' own calls (exactly the plain path)."""
    projections = [projection_of(m) for m in modules]
    if any(p is None for p in projections):
        return [m(x) for m in modules]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, in)
    outs = LoraProjectionsFunction.apply(x2, tuple(projections), *adapters_of(projections))
    return [o.view(*lead, o.shape[-1]) for o in outs]
