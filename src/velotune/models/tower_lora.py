"""The fused LoRA projections (fast/lora_linear.py) for the layers of transformers' Mllama vision tower and its
projector.

Why: PEFT's LoRA layer casts its input to the adapter's fp32 before the adapter (a copy of x per projection, a second
one where autocast casts it back to bf16, again in the checkpoint's recompute), and autograd keeps x once per branch.
The tower runs every tile's patches (4,128 positions an image) through 40 layers of 6 projections: in the H200
profile of a Llama-3.2-11B-Vision QLoRA step (BENCHMARKS.md, session 16) copies were 19% of the GPU time. Our fused
function runs x W^T + b + s (x A^T) B^T in the compute dtype as one autograd node per input (q, k and v share one).
The projector (7680 -> 4096 over every patch) is where this mattered most for memory: at the step's forward peak PEFT
held its input cast to fp32 (375 MiB) and 6 outputs and intermediates (389 MiB) in that profile.

The same rule as our decoders' fast path decides, per call: the model's `fast_path` setting (True: also off CUDA,
how tests run it; False: never; None: on CUDA), `VELOTUNE_DISABLE_KERNELS`, and weights not sharded by FSDP2; a
projection that cannot fuse (LoRA dropout, DoRA, a trained bias) runs as its module call, as PEFT computes it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .. import settings as env
from ..fast.lora_linear import lora_projections
from ..fast.plan import RuntimeSettings, is_sharded


def fuses(settings: RuntimeSettings, x: torch.Tensor, modules) -> bool:
    """Whether the tower's projections `modules` run fused for input x."""
    if env.current().disable_kernels or settings.fast_path is False:
        return False
    if settings.fast_path is None and not x.is_cuda:
        return False
    return not any(is_sharded(m) for m in modules)


def tower_projections(settings: RuntimeSettings, x: torch.Tensor, modules) -> list[torch.Tensor]:
    """x (..., in) through each of `modules` -> [(..., out_i)]: fused where `fuses`, else the modules' calls."""
    if fuses(settings, x, modules):
        return lora_projections(x, list(modules))
    return [m(x) for m in modules]


def fused_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Set on a MllamaVisionMLP instance: fc1, the activation, fc2, each through `tower_projections`."""
    settings = self._velotune_settings
    hidden = tower_projections(settings, hidden_states, (self.fc1,))[0]  # (B, L, intermediate)
    return tower_projections(settings, self.activation_fn(hidden), (self.fc2,))[0]  # (B, L, hidden)


def install_fused_mlps(vision_model: nn.Module, settings: RuntimeSettings) -> int:
    """Set `fused_mlp_forward` on the MLP of every layer of both Mllama vision encoders; returns how many."""
    count = 0
    for encoder in (vision_model.transformer, vision_model.global_transformer):
        for layer in encoder.layers:
            layer.mlp._velotune_settings = settings
            layer.mlp.forward = types.MethodType(fused_mlp_forward, layer.mlp)
            count += 1
    return count
