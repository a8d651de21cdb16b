"""Vision towers' LayerNorms return their input's dtype under autocast.

CUDA autocast runs `layer_norm` in fp32 and returns fp32; in a tower whose residual stream starts 16-bit
(Mllama's and Gemma 3's encoders: `hidden = residual + attention(layer_norm(hidden))`) that turns every later
hidden state fp32. Measured on the H200 (BENCHMARKS.md, session 14): Llama-3.2-11B-Vision's 40 vision-layer outputs,
which transformers' encoder keeps all of until the tower returns (its intermediate layers feed the projector), held
2.5 GiB in fp32 at the forward's peak; Unsloth's were bf16, half that. With the output cast back to the input's
dtype the tower runs as it does without autocast (the norm itself still computes in fp32 inside the kernel and
rounds once), and its activations take half the memory.

A forward hook on each such module instance (transformers' classes and torch's LayerNorm are not changed); it does
nothing where the output already has the input's dtype (no autocast, fp32 models, the CPU's autocast, which keeps
layer_norm 16-bit).
"""

from __future__ import annotations

import torch
from torch import nn

from .families import VISION_ENCODERS

_HALF = (torch.bfloat16, torch.float16)


def keep_input_dtype(module: nn.Module, args: tuple, output):
    """Forward hook: a 16-bit input's LayerNorm output cast back from autocast's fp32 to the input's dtype."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.dtype in _HALF \
            and output.dtype != x.dtype:
        return output.to(x.dtype)
    return None


def keep_tower_norms_16bit(model: nn.Module) -> int:
    """Hook every nn.LayerNorm under a vision encoder (vision/families.py VISION_ENCODERS) once; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.LayerNorm) or not any(part in VISION_ENCODERS for part in name.split(".")):
            continue
        if not getattr(module, "_velotune_keeps_dtype", False):
            module.register_forward_hook(keep_input_dtype)
            module._velotune_keeps_dtype = True
        count += 1
    return count
