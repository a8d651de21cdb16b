"""The fused LoRA projections (fast/lora_linear.py) for transformers' layers we run: the vision towers (Mllama's with
its projector, Qwen2-VL's and Qwen2.5-VL's) and the layers our decoders borrow (Mllama's cross-attention layers).

Why: PEFT's LoRA layer casts its input to the adapter's fp32 before the adapter (a copy of x per projection, a second
one where autocast casts it back to bf16, again in the checkpoint's recompute), and autograd keeps x once per branch.
The tower runs every tile's patches (4,128 positions an image) through 40 layers of 6 projections: in the H200
profile of a Llama-3.2-11B-Vision QLoRA step (BENCHMARKS.md, session 16) copies were 19% of the GPU time. Our fused
function runs x W^T + b + s (x A^T) B^T in the compute dtype as one autograd node per input (q, k and v share one).
Mllama's projector (7680 -> 4096 over every patch) held the most memory under PEFT: at the step's forward peak in that
run's snapshot, its input cast to fp32 (375 MiB) and 6 outputs and intermediates (389 MiB).

Mllama's cross-attention layers project the image states (8,200 positions at batch 2) to keys and values: in the
same run's snapshot PEFT's k/v intermediates were 201 MiB at the backward peak, during a cross layer's recompute.
Those layers are transformers' modules whose projections PEFT wraps after loading, so `install_fused_linears` sets the
fused forward on the LoRA wrappers themselves (VelotunePeftModel does it when it wraps a model).

The same rule as our decoders' fast path decides, per call: the model's `fast_path` setting (True: also off CUDA,
how tests run it; False: never; None: on CUDA), `VELOTUNE_DISABLE_KERNELS`, and weights not sharded by FSDP2; a
projection that cannot fuse (LoRA dropout, DoRA, a trained bias) runs as its module call, as PEFT computes it.
"""

from __future__ import annotations

import types

import torch
from transformers.activations import ACT2FN

from .. import settings as env
from ..fast.lora_linear import lora_projections, projection_of
from ..fast.lora_mlp import GATED_ACTIVATIONS, lora_mlp
from ..fast.lora_plain_mlp import lora_plain_mlp
from ..fast.plan import RuntimeSettings, is_sharded
from .foreign_checkpoints import recomputing


def fuses(settings: RuntimeSettings | None, x: torch.Tensor, modules) -> bool:
    """Whether the tower's projections `modules` run fused for input x (never without `settings`)."""
    if settings is None or env.current().disable_kernels or settings.fast_path is False:
        return False
    if settings.fast_path is None and not x.is_cuda:
        return False
    return not any(is_sharded(m) for m in modules)


def tower_projections(settings: RuntimeSettings | None, x: torch.Tensor, modules) -> list[torch.Tensor]:
    """x (..., in) through each of `modules` -> [(..., out_i)]: fused where `fuses`, else the modules' calls."""
    if fuses(settings, x, modules):
        return lora_projections(x, list(modules))
    return [m(x) for m in modules]


def _value_unused(mlp) -> bool:
    """Whether `mlp` runs in a tower layer's recomputation (foreign_checkpoints.TowerCheckpoint) and may return its
    output unset there: its layer only adds that output to the residual, or scales it by a gate that takes no
    gradient (install_fused_mlps), so only the output's gradient is used. Saves the recomputation's MLP matmuls and
    their host calls, as the decoders' recomputing MLP does (fast/lora_mlp.py)."""
    return recomputing() and not any(gate.requires_grad for gate in mlp._velotune_gates)


def fused_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Set on a tower MLP of fc1, activation, fc2 (Mllama's MllamaVisionMLP, Qwen2-VL's VisionMlp): one fused node
    that keeps x alone (fast/lora_plain_mlp.py) where both projections fuse, else each projection through
    `tower_projections`."""
    settings = self._velotune_settings
    act = self.activation_fn if hasattr(self, "activation_fn") else self.act
    if fuses(settings, hidden_states, (self.fc1, self.fc2)):
        out = lora_plain_mlp(hidden_states, self.fc1, self.fc2, act, value_unused=_value_unused(self))
        if out is not None:
            return out  # (..., hidden)
    hidden = tower_projections(settings, hidden_states, (self.fc1,))[0]  # (..., intermediate)
    return tower_projections(settings, act(hidden), (self.fc2,))[0]  # (..., hidden)


def _gated_kind(act: torch.nn.Module) -> str | None:
    """The name the decoders' fused gated MLP (fast/lora_mlp.py) knows the activation module `act` by, or None."""
    return next((name for name in GATED_ACTIVATIONS if type(ACT2FN[name]) is type(act)), None)


def fused_gated_mlp_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """Set on Qwen2.5-VL's vision MLP: down(act(gate(x)) * up(x)) as the decoders' fused gated MLP (one node keeping
    x and the gate/up outputs, where composing the projections and the activation kept four (N, I) tensors) where
    its activation has a kernel (its name set at install: `_velotune_kind`) and all three projections fuse; else gate
    and up as one fused node, then down."""
    settings = self._velotune_settings
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    if self._velotune_kind is not None and fuses(settings, hidden_state, projections):
        out = lora_mlp(hidden_state, *projections, self._velotune_kind, value_unused=_value_unused(self))
        if out is not None:
            return out  # (..., hidden)
    gate, up = tower_projections(settings, hidden_state, (self.gate_proj, self.up_proj))  # (..., intermediate)
    return tower_projections(settings, self.act_fn(gate) * up, (self.down_proj,))[0]  # (..., hidden)


def install_fused_mlps(mlps, settings: RuntimeSettings) -> int:
    """Set the fused forward on each tower MLP module of `mlps`, (module, gate) pairs: `gate` None where the layer
    adds the MLP's output to its residual, else the parameter it scales that output by first (Mllama's gated
    layers: its gradient needs the output's value). Gated when the module has `gate_proj`. Returns how many."""
    count = 0
    for mlp, gate in mlps:
        mlp._velotune_gates = () if gate is None else (gate,)  # a tuple: as an attribute, a Parameter would register
        gated = hasattr(mlp, "gate_proj")
        forward = fused_gated_mlp_forward if gated else fused_mlp_forward
        if gated:
            mlp._velotune_kind = _gated_kind(mlp.act_fn)
        mlp._velotune_settings = settings
        mlp.forward = types.MethodType(forward, mlp)
        count += 1
    return count


def fused_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Set on a PEFT LoRA layer over a Linear/Linear4bit: the fused projection where `fuses` and the layer can fuse
    (one active adapter, no dropout, ...), else PEFT's own forward."""
    projection = None if args or kwargs or not fuses(self._velotune_settings, x, (self,)) else projection_of(self)
    if projection is not None:
        return lora_projections(x, [self], projections=[projection])[0]
    return type(self).forward(self, x, *args, **kwargs)


def install_fused_linears(module: torch.nn.Module, settings: RuntimeSettings) -> int:
    """Set `fused_linear_forward` on every PEFT LoRA layer under `module` (those with `base_layer` and `lora_A`);
    returns how many."""
    count = 0
    for layer in module.modules():
        if hasattr(layer, "base_layer") and hasattr(layer, "lora_A"):
            layer._velotune_settings = settings
            layer.forward = types.MethodType(fused_linear_forward, layer)
            count += 1
    return count
