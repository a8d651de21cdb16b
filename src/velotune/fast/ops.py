"""The kernel ops the fast path calls, through the `velotune.kernels` contract.

Each name resolves to the kernel package's op when it exports one (Triton on CUDA, its own
reference elsewhere) and otherwise to the plain PyTorch math below, with the same signature and
semantics. Resolving per name, at import time, keeps the fast path runnable and testable while
the kernel package is still growing: a kernel that lands later is picked up without touching
the callers.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..kernels.cross_entropy import IGNORE_INDEX
from ..kernels.rms_norm import rms_norm_reference
from ..kernels.rope import apply_rope_reference


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / rms(x) * (offset + w), normalised in fp32, returned in x's dtype (the one reference)."""
    return rms_norm_reference(x, weight, eps, offset)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = True):
    """q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, R) -> rotated (q, k); R < D is partial
    rotary. Always out of place here (`inplace` is the kernel's permission to write into q/k)."""
    return apply_rope_reference(q, k, cos, sin)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def _fused_linear_cross_entropy(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,), already shifted
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    num_items_in_batch=None,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain math: full logits, optional tanh soft-cap, fp32 cross-entropy."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if reduction == "mean" and num_items_in_batch is not None:
        total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def _dequantize_nf4_weight(param_or_module) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (Params4bit, or a module holding one) -> dense (out, in) tensor."""
    from ..quant.nf4 import dequantize_nf4_state  # our exact torch path: the same bytes on every device and CPU

    weight = getattr(param_or_module, "weight", param_or_module)
    return dequantize_nf4_state(weight.data, weight.quant_state)


_FALLBACKS = {
    "rms_norm": _rms_norm,
    "apply_rope": _apply_rope,
    "swiglu": _swiglu,
    "geglu": _geglu,
    "fused_linear_cross_entropy": _fused_linear_cross_entropy,
    "dequantize_nf4_weight": _dequantize_nf4_weight,
}


def _resolve() -> dict:
    try:
        kernels = importlib.import_module("velotune.kernels")
    except ImportError:
        kernels = None
    return {name: getattr(kernels, name, fallback) for name, fallback in _FALLBACKS.items()}


_OPS = _resolve()
rms_norm = _OPS["rms_norm"]
apply_rope = _OPS["apply_rope"]
swiglu = _OPS["swiglu"]
geglu = _OPS["geglu"]
fused_linear_cross_entropy = _OPS["fused_linear_cross_entropy"]
dequantize_nf4_weight = _OPS["dequantize_nf4_weight"]
# Which ops come from the kernel package (the rest are the fallbacks above); logged by fast_path.
FROM_KERNELS = tuple(name for name, op in _OPS.items() if op is not _FALLBACKS[name])
