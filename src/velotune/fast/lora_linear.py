"""Fused LoRA projections: y = x W^T + b + s * (x A^T) B^T with a hand-written backward.

Why: PEFT's LoRA layer runs the frozen base layer and the adapter as separate modules, so
autograd keeps the input once per branch, the adapter's (N, r) intermediate, and (for 4-bit
bases) bitsandbytes' own saved state. Here several projections that read the same input (q, k,
v; or o alone) are one autograd node that saves that input, the adapters cast to the compute
dtype and x A^T ((N, R), R = the summed ranks: a few % of x); 4-bit base weights are
dequantized just in time in forward and again in backward, never kept. The base weight and bias
are frozen (no gradient); the adapters get dA and dB.

Matmuls are plain torch (cuBLAS); the computation dtype is the input's (or autocast's), and the
adapter gradients are returned in the adapters' own dtype (PEFT keeps them in fp32). On a GPU
these small ops are bound by launch overhead, so each is counted: the A matrices of a group are
stacked (one matmul for all x A^T, one for all dA), the casts of A/B made in forward are reused
in backward, the LoRA scaling rides in the matmuls' alpha, biases in addmm
(bench/count_fused_ops.py counts the calls per layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.fp8 import is_fp8_weight
from ..quant.int8 import is_linear8bit
from ..quant.linear import is_linear4bit
from ..kernels import dequantize_nf4_weight
from .fp8_matmul import fp8_grad_input, fp8_linear, quantize_input


@dataclass(frozen=True, eq=False)
class LoraProjection:
    """One projection as the fused functions see it (the adapter tensors travel separately, as
    autograd inputs; `lora_A`/`lora_B` here are None when the projection has no active adapter)."""

    weight: torch.Tensor  # (out, in) dense, or a bitsandbytes Params4bit (packed NF4)
    bias: torch.Tensor | None  # (out,) frozen base bias
    lora_A: torch.Tensor | None  # (r, in)
    lora_B: torch.Tensor | None  # (out, r)
    scaling: float
    weight_scale: torch.Tensor | None = None  # (out,) fp32 row scales of an FP8-stored weight (quant/fp8.py)
    fp8: bool = False  # the base GEMMs run in FP8 this step (plan.py decides; fp8_matmul.py computes)


def _is_4bit(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None and type(weight).__name__ == "Params4bit"


def _is_base_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear8bitLt is an nn.Linear whose int8 weight means nothing without its row scales:
    # it runs as a module call (the plain path), never as a dense weight here.
    if is_linear8bit(module):
        return False
    return isinstance(module, nn.Linear) or (
        is_linear4bit(module) and _is_4bit(getattr(module, "weight", None))
    )


def why_not_fused(module: nn.Module) -> str | None:
    """None when `module` can run through the fused functions, else the reason it cannot."""
    return inspect_projection(module)[0]


def projection_of(module: nn.Module) -> LoraProjection | None:
    """The fused view of a projection module, or None when it must run as a module call."""
    return inspect_projection(module)[1]


def inspect_projection(module: nn.Module) -> tuple[str | None, LoraProjection | None]:
    """(None, the fused view) when `module` can run through the fused functions, else (the reason
    it cannot, None). One walk over the module's attributes serves both (plan.plan_step runs
    it for every projection on every forward)."""
    if _is_base_linear(module):
        if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
            return "its base weight or bias is trained (the fused path trains adapters only)", None
        return None, LoraProjection(module.weight, module.bias, None, None, 0.0, _fp8_scale(module))
    base = getattr(module, "base_layer", None)
    lora_A = getattr(module, "lora_A", None)
    if base is None or lora_A is None:
        return f"it is a {type(module).__name__}, not a Linear/Linear4bit or PEFT LoRA layer over one", None
    if not _is_base_linear(base):
        return f"its base layer is a {type(base).__name__} (only Linear, FP8 and bitsandbytes Linear4bit fuse)", None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "its base weight or bias is trained (bias='all'/'lora_only' or a trainable base)", None
    scale = _fp8_scale(base)
    base_only = LoraProjection(weight, bias, None, None, 0.0, scale)
    if module.disable_adapters or module.merged:
        return None, base_only  # the base layer alone computes the output
    active = [name for name in module.active_adapters if name in lora_A]
    if len(active) > 1:
        return f"{len(active)} adapters are active at once ({active}); the fused path runs one", None
    if not active:
        return None, base_only
    name = active[0]
    dropout, lora_B = module.lora_dropout[name], module.lora_B[name]
    if not isinstance(dropout, nn.Identity):
        return f"lora_dropout={dropout.p} (the fused path needs lora_dropout=0)", None
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return "it uses a LoRA variant (DoRA or similar) the fused path does not implement", None
    if lora_B.bias is not None:
        return "its adapter has a bias (lora_bias=True)", None
    return None, LoraProjection(weight, bias, lora_A[name].weight, lora_B.weight, float(module.scaling[name]), scale)


def _fp8_scale(module: nn.Module) -> torch.Tensor | None:
    """The row scales of an FP8-stored base layer (quant/fp8.py FP8Linear), else None."""
    return getattr(module, "weight_scale", None) if is_fp8_weight(module.weight) else None


def dense_weight(weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in) weight in `dtype`; a 4-bit weight is dequantized here, so callers drop it after use.
    An FP8 weight is multiplied by its row scales `scale` (out,) in fp32 and cast once."""
    if _is_4bit(weight):
        return dequantize_nf4_weight(weight).to(dtype)
    if is_fp8_weight(weight):
        return (weight.float() * scale[:, None]).to(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


@dataclass(frozen=True)
class GroupLayout:
    """Where the adapters of projections sharing one input sit in the stacked A (R = sum of ranks).

    The A matrices (r_i, in) of a group (q/k/v, gate/up, or one projection) are stacked into one
    (R, in) matrix, so forward computes x @ [A_q; A_k; A_v]^T as one matmul and backward gets
    every dA from one matmul too; `rows[j]` is adapter j's slice of those R rows.
    """

    with_adapter: tuple[int, ...]  # indices (into the group) of projections that have an adapter
    rows: tuple[slice, ...]  # each one's rows of the stacked A / columns of x A^T
    dtypes: tuple[torch.dtype, ...]  # the adapters' own dtypes (A_0, .., A_k, B_0, .., B_k), for their gradients


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Consecutive contiguous views of a flat tensor, one per shape."""
    views, start = [], 0
    for shape in shapes:
        n = shape[0] * shape[1]
        views.append(flat[start:start + n].view(shape))
        start += n
    return views


def _adapters_in(dtype: torch.dtype, As, Bs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(A stacked (R, in), [B_j (out_j, r_j)]) in `dtype`. The A's (r_j, in) flattened one after
    the other are the stacked A in row-major order, so with a cast every adapter of the group
    goes through one cat and one cast (instead of a cast per tensor) and is viewed back out."""
    if all(t.dtype == dtype for t in (*As, *Bs)):
        return (As[0] if len(As) == 1 else torch.cat(As)), list(Bs)
    flat = torch.cat([t.reshape(-1) for t in (*As, *Bs)]).to(dtype)
    R = sum(A.shape[0] for A in As)
    a, *bs = _split(flat, [(R, As[0].shape[1]), *(B.shape for B in Bs)])
    return a, bs


def usable(stacked, x: torch.Tensor):
    """`stacked` (a group's StackedAdapters, stacked_adapters.py) when a call with input x (N, in) may
    read it: no autograd (training keeps the adapters as autograd inputs) and x in the buffers' dtype
    and device; else None (the call stacks and casts the adapters itself, as in training)."""
    if stacked is None or torch.is_grad_enabled() or stacked.a.dtype != x.dtype or stacked.a.device != x.device:
        return None
    return stacked


def adapter_inputs(x: torch.Tensor, adapters, stacked=None) -> tuple[GroupLayout, list[torch.Tensor]]:
    """What group_backward needs of a group's adapters, without the base outputs: (layout,
    [A stacked (R, in), x A^T (N, R), B_j (out_j, r_j)...]) in x's dtype (empty when no
    projection of the group has an adapter). One cat + one cast of all the group's adapters,
    one matmul for every x A_j^T. `stacked` (no-grad calls in generation: stacked_adapters.py):
    the group's adapters already stacked and cast, read as they are (no cat, no cast)."""
    if stacked is not None:
        return stacked.layout, [stacked.a, x @ stacked.a.t(), *stacked.bs]  # x A^T: (N, R)
    with_adapter = tuple(i for i, A in enumerate(adapters[0::2]) if A is not None)
    if not with_adapter:
        return GroupLayout((), (), ()), []
    As = [adapters[2 * i] for i in with_adapter]
    Bs = [adapters[2 * i + 1] for i in with_adapter]
    a, bs = _adapters_in(x.dtype, As, Bs)  # (R, in), [(out_j, r_j)]
    rows, start = [], 0
    for A in As:
        rows.append(slice(start, start + A.shape[0]))
        start += A.shape[0]
    layout = GroupLayout(with_adapter, tuple(rows), tuple(t.dtype for t in (*As, *Bs)))
    return layout, [a, x @ a.t(), *bs]  # x A^T: (N, R)


def group_forward(x: torch.Tensor, projections, adapters, stacked=None
                  ) -> tuple[list[torch.Tensor], GroupLayout, list[torch.Tensor]]:  # fmt: skip
    """x (N, in) -> ([(N, out_i)], layout, tensors backward needs), in x's dtype.

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T. Launches per group: adapter_inputs, then per
    projection one matmul with W (addmm when biased) and one addmm adding the LoRA term with the
    scaling as alpha. The adapters' casts and x A^T are returned for backward (saved, not
    recomputed; x A^T is (N, R), small next to x). `stacked`: see adapter_inputs.
    """
    dtype = x.dtype
    outs = []
    x8 = None
    for p in projections:
        if p.fp8:  # one FP8 GEMM; x is quantized once for the group (fp8_matmul.py)
            if x8 is None:
                x8, x_scale = quantize_input(x)  # (N, in) e4m3, (N, 1)
            outs.append(fp8_linear(x8, x_scale, p, dtype))  # (N, out)
            continue
        w = dense_weight(p.weight, dtype, p.weight_scale)  # (out, in); 4-bit: dequantized now, dropped after use
        outs.append(x @ w.t() if p.bias is None else torch.addmm(_cast(p.bias, dtype), x, w.t()))  # (N, out)
        del w
    layout, saved = adapter_inputs(x, adapters, stacked)
    if saved:
        _, xa, *bs = saved
        for i, r, b in zip(layout.with_adapter, layout.rows, bs):
            outs[i].addmm_(xa[:, r], b.t(), alpha=projections[i].scaling)
    return outs, layout, saved


def group_backward(
    grads: list[torch.Tensor],  # [(N, out_i)] in x's dtype
    x: torch.Tensor,  # (N, in)
    projections,
    layout: GroupLayout,
    saved: list[torch.Tensor],  # group_forward's [A stacked (R, in), x A^T (N, R), B_j (out_j, r_j)...]
    need_dx: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dx, [dA_0, dB_0, dA_1, dB_1, ...]) of `group_forward`; adapter gradients in the adapters'
    dtypes, None for projections without an adapter; dx None when not needed.

    The scaling is folded into the matmuls (alpha=s, beta=0): s (g B)^T of every adapter lands in
    one (R, N) buffer, so dx gets all LoRA terms from one addmm and all dA from one matmul; every
    dA/dB is written into one flat buffer, cast to the adapters' dtype by one launch.
    """
    dtype = x.dtype
    dx = None
    if need_dx:
        for p, g in zip(projections, grads):
            if p.fp8:
                part = fp8_grad_input(g, p, dtype)  # (N, in)
                dx = part if dx is None else dx.add_(part)
                continue
            w = dense_weight(p.weight, dtype, p.weight_scale)  # (out, in)
            dx = g @ w if dx is None else dx.addmm_(g, w)  # (N, in)
            del w
    adapter_grads: list[torch.Tensor | None] = [None] * (2 * len(projections))
    if not layout.with_adapter:
        return dx, adapter_grads
    a, xa, *bs = saved
    shapes = [a.shape, *(b.shape for b in bs)]
    flat = torch.empty(sum(s[0] * s[1] for s in shapes), dtype=dtype, device=x.device)
    dA, *dBs = _split(flat, shapes)  # (R, in), [(out_j, r_j)]
    gb_t = torch.empty((a.shape[0], x.shape[0]), dtype=dtype, device=x.device)  # (R, N): s_j (g_j B_j)^T
    ignored = gb_t.new_empty(())  # addmm's input; beta=0 ignores it (documented: not even NaN propagates)
    for i, r, b, dB in zip(layout.with_adapter, layout.rows, bs, dBs):
        g, s = grads[i], projections[i].scaling
        gb_t[r].addmm_(b.t(), g.t(), beta=0, alpha=s)  # (r, N)
        torch.addmm(ignored, g.t(), xa[:, r], beta=0, alpha=s, out=dB)  # (out, r)
    if dx is not None:
        dx.addmm_(gb_t.t(), a)  # (N, in)
    torch.mm(gb_t, x, out=dA)  # (R, in)
    if len(set(layout.dtypes)) == 1:  # one cast for the group; each adapter gets a contiguous view
        dA, *dBs = _split(_cast(flat, layout.dtypes[0]), shapes)
    k = len(layout.with_adapter)
    for j, (i, r) in enumerate(zip(layout.with_adapter, layout.rows)):
        adapter_grads[2 * i] = _cast(dA[r], layout.dtypes[j])
        adapter_grads[2 * i + 1] = _cast(dBs[j], layout.dtypes[k + j])
    return dx, adapter_grads


def adapters_of(projections) -> list[torch.Tensor | None]:
    """[A0, B0, A1, B1, ...]: the autograd inputs the fused functions take after x."""
    return [t for p in projections for t in (p.lora_A, p.lora_B)]


class LoraProjectionsFunction(torch.autograd.Function):
    """Several LoRA projections of one input (q/k/v, or o alone): one node that saves x once,
    plus the adapters' casts and x A^T (see group_forward)."""

    @staticmethod
    def forward(ctx, x, projections, *adapters):  # x (N, in); adapters A0, B0, A1, B1, ...
        with autocast_off(x):
            outs, layout, saved = group_forward(x, projections, adapters)
        ctx.projections, ctx.layout = projections, layout
        ctx.save_for_backward(x, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *saved = ctx.saved_tensors
        with autocast_off(x):
            grads = [g.reshape(-1, g.shape[-1]).to(x.dtype) for g in grads]  # (N, out_i)
            dx, adapter_grads = group_backward(grads, x, ctx.projections, ctx.layout, saved, ctx.needs_input_grad[0])
        return (dx, None, *adapter_grads)


def autocast_off(x: torch.Tensor):
    """A context with autocast off for x's device: the fused functions pick their dtypes
    themselves. Nothing to enter when it is off already, the usual case (a few host
    microseconds per call, several calls per layer)."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def lora_projections(x: torch.Tensor, modules: list[nn.Module], projections=None,
                     gemv_rows: int = 0, prenorm: nn.Module | None = None,
                     residual: torch.Tensor | None = None, stacked=None) -> list[torch.Tensor]:
    """x (..., in) through each module -> [(..., out_i)], fused when every module allows it,
    otherwise the modules' own calls (exactly the plain path). `projections`: the modules' fused
    views when the caller already has them (plan.LayerPlan), else they are looked up here.
    `gemv_rows` (the plan's): up to this many rows without autograd, the decode GEMV kernels
    run the base weights (decode_linear.py). `prenorm`: an RMSNorm module to apply to x first
    (decode steps hand it over so the GEMVs normalise x as they read it). `residual` (..., out),
    one module: the result is residual + its output (a decode step's o projection adds it in the
    GEMV's epilogue). `stacked`: the group's adapters in generation's persistent buffers
    (stacked_adapters.py), read instead of the adapters by calls without autograd."""
    if projections is None:
        projections = [projection_of(m) for m in modules]
    if prenorm is not None:
        from . import decode_linear
    if any(p is None for p in projections):
        x = x if prenorm is None else decode_linear.normalized(x, prenorm)
        return _plus(residual, [m(x) for m in modules])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, in)
    stacked = usable(stacked, x2)
    if gemv_rows:
        from . import decode_linear  # imports this module

        if decode_linear.applies(x2, gemv_rows):
            res2 = None if residual is None else residual.reshape(-1, residual.shape[-1])
            outs = decode_linear.decode_projections(x2, tuple(projections), prenorm, res2, stacked)
            if outs is not None:
                return [o.view(*lead, o.shape[-1]) for o in outs]
    if prenorm is not None:
        x2 = decode_linear.normalized(x2, prenorm)
    if stacked is not None:  # no autograd: the forward alone, on the persistent buffers
        with autocast_off(x2):
            outs, _, _ = group_forward(x2, tuple(projections), adapters_of(projections), stacked)
    else:
        outs = LoraProjectionsFunction.apply(x2, tuple(projections), *adapters_of(projections))
    return _plus(residual, [o.view(*lead, o.shape[-1]) for o in outs])


def _plus(residual: torch.Tensor | None, outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[residual + outs[0]] (the decoder's residual add, where no kernel took it), or outs."""
    return outs if residual is None else [residual + outs[0]]
