"""Gated activations of the MLP: SwiGLU silu(gate) * up and GeGLU gelu(gate) * up (tanh or exact).

One elementwise kernel per direction, the activation chosen at compile time. The math is fp32
(one rounding to the input dtype at the end, where torch rounds after each op); backward
recomputes the activation from the saved gate/up instead of saving act(gate).
"""

from functools import partial

import torch
import torch.nn.functional as F

from ._triton import jit, kernel_for, should_use_triton, tl

_SILU, _GELU_TANH, _GELU_EXACT = 0, 1, 2
_ACTIVATIONS = {"silu": _SILU, "gelu_tanh": _GELU_TANH, "gelu_none": _GELU_EXACT}
_BLOCK = 1024


@jit
def _glu_kernel(
    GATE, UP, OUT, DOUT, DGATE, DUP,  # all flat, n elements; OUT unused in backward, D* in forward
    n, ACT: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One kernel for both directions; sigmoid/tanh spelled with tl.exp (stable across Triton 3.x).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        sig = 1.0 / (1.0 + tl.exp(-g))
        act = g * sig
        slope = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:  # gelu, tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
        c = 0.7978845608028654  # sqrt(2/pi)
        t = 2.0 / (1.0 + tl.exp(-2.0 * c * (g + 0.044715 * g * g * g))) - 1.0  # tanh(u) = 2 sigmoid(2u) - 1
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    else:  # exact gelu: g * Phi(g)
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        slope = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    if BACKWARD:
        dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DGATE + offs, (dy * u * slope).to(DGATE.dtype.element_ty), mask=mask)
        tl.store(DUP + offs, (dy * act).to(DUP.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


class GatedActivationFunction(torch.autograd.Function):
    """act(gate) * up with a Triton kernel each way; saves gate and up (the inputs), nothing else."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: int):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n:
            kernel_for(_glu_kernel)[(_cdiv(n, _BLOCK),)](
                gate, up, out, out, out, out, n, ACT=activation, BACKWARD=False, BLOCK=_BLOCK
            )
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            kernel_for(_glu_kernel)[(_cdiv(n, _BLOCK),)](
                gate, up, dout, dout, dgate, dup, n, ACT=ctx.activation, BACKWARD=True, BLOCK=_BLOCK
            )
        return dgate, dup, None


def gated_activation_backward(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, activation: str, *,
                              use_triton: bool | None = None, overwrite: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of act(gate) * up for the upstream gradient `dout`, for a caller that is itself a backward
    (the fused LoRA MLP): the backward kernel launched directly, without building an autograd node for the
    activation and re-entering the autograd engine to differentiate it (host time on every call of a
    launch-bound step). `activation`: "silu", "gelu_tanh" or "gelu_none". Same kernel, same inputs, so the
    result is bit for bit what `GatedActivationFunction`'s backward gives; the reference differentiates the
    reference formula. `overwrite=True` writes (d gate, d up) into `gate` and `up` (contiguous) themselves, for a
    caller that needs them no more: two (n, I) buffers less at the peak of an MLP backward (each element is read
    before it is written, by the same program)."""
    _check(gate, up, "gated_activation_backward")
    kind = _ACTIVATIONS[activation]
    if not should_use_triton(gate, use_triton):
        reference = swiglu_reference if kind == _SILU else partial(
            geglu_reference, approximate="tanh" if kind == _GELU_TANH else "none")
        with torch.enable_grad():
            g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
            out = reference(g, u)
        dgate, dup = torch.autograd.grad(out, (g, u), dout)
        return (gate.copy_(dgate), up.copy_(dup)) if overwrite else (dgate, dup)
    if overwrite and not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("gated_activation_backward(overwrite=True) needs contiguous gate and up")
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.contiguous()
    dgate, dup = (gate, up) if overwrite else (torch.empty_like(gate), torch.empty_like(up))
    n = gate.numel()
    if n:
        kernel_for(_glu_kernel)[(_cdiv(n, _BLOCK),)](
            gate, up, dout, dout, dgate, dup, n, ACT=kind, BACKWARD=True, BLOCK=_BLOCK
        )
    return dgate, dup


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(gate: torch.Tensor, up: torch.Tensor, op: str) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"{op}: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """silu(gate) * up (Llama, Mistral, Qwen, Phi-3 MLPs)."""
    _check(gate, up, "swiglu")
    if not should_use_triton(gate, use_triton):
        return swiglu_reference(gate, up)
    return GatedActivationFunction.apply(gate, up, _SILU)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, use_triton: bool | None = None
) -> torch.Tensor:
    """gelu(gate) * up (Gemma MLPs); approximate "tanh" (gelu_pytorch_tanh) or "none" (exact erf)."""
    _check(gate, up, "geglu")
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    if not should_use_triton(gate, use_triton):
        return geglu_reference(gate, up, approximate)
    return GatedActivationFunction.apply(gate, up, _ACTIVATIONS[f"gelu_{approximate}"])
