"""Decode-time projections: the base weights through the small-batch GEMV kernels, LoRA unmerged.

Why: a decode step multiplies a few token rows by every weight once, so its time is the reading
of the weights, and at batch 1 cuBLAS's skinny GEMVs, its split-K reductions and the ~25 small
launches per layer leave a third of that bound unused (BENCHMARKS.md). Here:

  * q, k and v (one input) are one launch of kernels/gemv.py over their stacked output rows;
  * gate and up are one launch whose epilogue writes act(gate) * up, when neither has an adapter
    or a bias (an adapter's term must be added before the activation);
  * 4-bit (NF4) weights go through our NF4 GEMVs, which dequantize in registers, where the
    training path would dequantize each weight to bf16 first: kernels/nf4_gemv_stream.py for up to
    `NF4_STREAM_ROWS` rows, kernels/nf4_gemv.py above (bitsandbytes' gemv_4bit at one row on CUDA
    only when `OWN_NF4_GEMV_AT_ONE_ROW` is turned off, for comparison);
  * LoRA adapters stay unmerged: x A^T for every adapter of a group is one matmul and each B
    term one addmm into its output (as lora_linear.group_forward), biases one add each;
  * the decoder layer's pre-norms (input_layernorm before q/k/v, post_attention_layernorm before
    gate/up) run inside those GEMVs (`prenorm`): each program normalises the rows of x it reads,
    so the normalised x is never written and the norm costs no launch (`FUSE_NORM`). With adapters
    the normalised x is needed for x A^T too, so it is computed first by the RMSNorm kernel;
  * the layer's two residual adds run in the o and down GEMVs' epilogues (`residual`) when those
    projections have no adapter or bias (else one add after them, as before).

Only without autograd (the engine's no-grad decode) and for at most `plan.gemv_rows` rows;
anything else returns None and the caller runs the training path's fused functions. Shapes are
fixed per call, so a decode step through here captures as a CUDA graph like any other.
"""

from __future__ import annotations

from functools import partial

import torch

from ..kernels import geglu, rms_norm, swiglu
from ..kernels.gemv import ACTIVATIONS, MAX_ROWS, gemv
from ..kernels.nf4_gemv import nf4_gemv
from ..kernels.nf4_gemv_stream import nf4_gemv_stream
from .lora_linear import LoraProjection, _cast, _is_4bit, adapter_inputs, adapters_of, usable

# The epilogue's activation ids (kernels/gemv.py ACTIVATIONS) -> the separate activation kernel,
# used when gate or up has an adapter.
_GATED = {0: swiglu, 1: partial(geglu, approximate="tanh"), 2: partial(geglu, approximate="none")}
# The decoder layer hands its pre-norms to the GEMVs (False: it runs them itself, as before).
# Module-level so the bench and tests can compare.
FUSE_NORM = True
# 4-bit weights at one row on CUDA: kernels/nf4_gemv_stream.py (1.0-1.3 TB/s of packed weights on the H200
# per projection group, against gemv_4bit's 0.5-1.0; 8B NF4 batch-1 decode 248.5 against 198.1 tokens/s,
# BENCHMARKS.md) unless this is False (then bitsandbytes' gemv_4bit, for comparison: bench_generate's `nf4`
# row). 2..8 rows take kernels/nf4_gemv.py where the plan allows them (plan.GEMV_ROWS), and the CPU too.
OWN_NF4_GEMV_AT_ONE_ROW = True
# Our 4-bit GEMVs: rows of x up to this many go to kernels/nf4_gemv_stream.py (built for bandwidth at
# one row), more rows to kernels/nf4_gemv.py (decodes each code once for all rows).
NF4_STREAM_ROWS = 1


def applies(x: torch.Tensor, gemv_rows: int) -> bool:
    """Whether x (N, in) is a decode-sized input the GEMV kernels take under a plan allowing `gemv_rows`."""
    return 0 < x.shape[0] <= min(gemv_rows, MAX_ROWS) and not torch.is_grad_enabled()


def fuses_norm(x: torch.Tensor, gemv_rows: int) -> bool:
    """Whether a decoder layer should hand its pre-norms to the GEMVs for x (..., C)."""
    return FUSE_NORM and applies(x.reshape(-1, x.shape[-1]), gemv_rows)


def _norm_args(norm) -> tuple:
    """(weight, eps, offset) of our RMSNorm modules (models/layers.py: Llama's and Gemma's 1 + w)."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm.weight, getattr(norm, "eps", 1e-6) if eps is None else eps, float(getattr(norm, "offset", 0.0))


def normalized(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm(x) as the norm module computes it on the fast path (kernels/rms_norm.py)."""
    weight, eps, offset = _norm_args(norm)
    return rms_norm(x, weight, eps, offset)


def _base(x: torch.Tensor, projections, activation: str | None = None, norm=None, residual=None
          ) -> list[torch.Tensor] | None:  # fmt: skip
    """[x W_i^T] (or [act(x gate^T) * (x up^T)], or [residual + x W^T]) through one GEMV launch,
    of RMSNorm(x) with the norm module `norm`, or None for mixed weights."""
    weights = [p.weight for p in projections]
    four_bit = [_is_4bit(w) for w in weights]
    args = None if norm is None else _norm_args(norm)
    if all(four_bit):
        kernel = nf4_gemv_stream if x.shape[0] <= NF4_STREAM_ROWS else nf4_gemv
        return kernel(x, weights, activation, norm=args, residual=residual)
    if not any(four_bit) and all(w.dtype == x.dtype and w.device == x.device for w in weights):
        return gemv(x, weights, activation, norm=args, residual=residual)
    return None


def _bitsandbytes_rows(x: torch.Tensor, projections) -> bool:
    """Whether these 4-bit projections take bitsandbytes' one-row GEMV (see OWN_NF4_GEMV_AT_ONE_ROW)."""
    return (not OWN_NF4_GEMV_AT_ONE_ROW and x.shape[0] == 1 and x.is_cuda
            and all(_is_4bit(p.weight) for p in projections))


def _bitsandbytes_gemv(x: torch.Tensor, projections) -> list[torch.Tensor]:
    """[x W_i^T] (1, out_i) through bitsandbytes' gemv_4bit (what its Linear4bit runs for one token)."""
    import bitsandbytes as bnb

    return [bnb.matmul_4bit(x, p.weight.t(), quant_state=p.weight.quant_state) for p in projections]


def decode_projections(x: torch.Tensor, projections: tuple[LoraProjection, ...], norm=None,
                       residual: torch.Tensor | None = None, stacked=None) -> list[torch.Tensor] | None:  # fmt: skip
    """x (N, in) -> [(N, out_i)]: y_i = x' W_i^T + b_i + s_i (x' A_i^T) B_i^T with x' = x, or
    RMSNorm(x) with the norm module `norm`; `residual` (N, out), one projection: residual + y.
    `stacked`: the group's adapters in generation's persistent buffers (lora_linear.adapter_inputs).
    None when the kernels cannot run (the caller's path)."""
    bitsandbytes = _bitsandbytes_rows(x, projections)
    if norm is not None and (bitsandbytes or any(p.lora_A is not None for p in projections)):
        x, norm = normalized(x, norm), None  # x A^T needs the normalised x itself; bitsandbytes takes no norm
    in_epilogue = (residual is not None and not bitsandbytes and projections[0].lora_A is None
                   and projections[0].bias is None)
    if bitsandbytes:
        outs = _bitsandbytes_gemv(x, projections)
    else:
        outs = _base(x, projections, norm=norm, residual=residual if in_epilogue else None)
    if outs is None:
        return None
    for out, p in zip(outs, projections):
        if p.bias is not None:
            out.add_(_cast(p.bias, out.dtype))
    layout, saved = adapter_inputs(x, adapters_of(projections), usable(stacked, x))
    if saved:
        _, xa, *bs = saved  # x A^T (N, R) of every adapter of the group, B_j (out_j, r_j)
        for i, rows, b in zip(layout.with_adapter, layout.rows, bs):
            outs[i].addmm_(xa[:, rows], b.t(), alpha=projections[i].scaling)
    if residual is not None and not in_epilogue:
        outs[0] = residual + outs[0]
    return outs


def decode_mlp(x: torch.Tensor, projections: tuple[LoraProjection, ...], activation: str, norm=None,
               residual: torch.Tensor | None = None, stacked=(None, None)) -> torch.Tensor | None:  # fmt: skip
    """x (N, H) -> down(act(gate(x')) * up(x')) (N, H) (+ `residual`), x' = x or RMSNorm(x) with the
    norm module `norm`; `stacked`: the (gate/up, down) groups' persistent adapter buffers or None.
    None when the kernels cannot run (the caller's fused MLP runs)."""
    if activation not in ACTIVATIONS:
        return None
    gate, up, down = projections
    if all(p.lora_A is None and p.bias is None for p in (gate, up)) and not _bitsandbytes_rows(x, (gate, up)):
        fused = _base(x, (gate, up), activation, norm)  # [(N, I)]: act(g) * u from the epilogue
        if fused is None:
            return None
        h = fused[0]
    else:
        gate_up = decode_projections(x, (gate, up), norm, stacked=stacked[0])
        if gate_up is None:
            return None
        h = _GATED[ACTIVATIONS[activation]](*gate_up)  # (N, I)
    out = decode_projections(h, (down,), residual=residual, stacked=stacked[1])
    return None if out is None else out[0]
