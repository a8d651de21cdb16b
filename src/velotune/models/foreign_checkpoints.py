"""Gradient checkpoints for transformers' repeated layers that transformers' own toggle leaves unchecked.

Since transformers 5, a layer is checkpointed by its class: `GradientCheckpointingLayer` reads its instance's
`gradient_checkpointing` flag, which `activation_checkpointing_enable` / `gradient_checkpointing_enable` sets.
Some towers still hold plain `nn.Module` layers under an encoder that carries the flag but never reads it:
Mllama's vision encoders (`MllamaVisionEncoder`, 32 local + 8 global layers over every tile, ~0.8 GB of kept
activations a layer for an 11B model at batch 2) are the case in every transformers 5.x we run. Their
activations were all kept, so an 11B QLoRA step peaked at 36 GiB where a checkpointed one needs ~10.

`checkpoint_foreign_layers` gives each such layer, on the instance (transformers' classes are untouched), a
`forward` that runs the class's forward under torch's non-reentrant checkpoint when the instance's
`gradient_checkpointing` flag is on and the layer trains with gradients enabled, and the plain forward
otherwise. The flag is the one transformers' toggle sets on every module that has it, so its
enable/disable calls (Trainer's included) switch these layers too. Non-reentrant always, whatever function the
toggle passes: these layers take their hidden states as keyword arguments (Mllama), which a reentrant
checkpoint would cut from the graph.

Our decoders checkpoint their own layers (fast/checkpointing.py, the step plan), so their layers are skipped.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..fast.checkpointing import plain_checkpoint


def _checkpointed_forward(self, *args, **kwargs):
    """The class's forward, checkpointed while the instance's flag is on and it trains with grad."""
    forward = functools.partial(type(self).forward, self, **kwargs)
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return plain_checkpoint(forward, *args)
    return forward(*args)


def foreign_layers(model: nn.Module, own: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """(name, layer) of each layer that transformers' toggle flags but does not checkpoint: the elements of
    the `nn.ModuleList` children of a module carrying a `gradient_checkpointing` flag (transformers'
    mark of an encoder or stack), when they are not `GradientCheckpointingLayer`s. Modules of the `own`
    classes (our decoders, which checkpoint their layers themselves) and everything under them are left out."""
    skipped = [name for name, module in model.named_modules() if isinstance(module, own)]
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (GradientCheckpointingLayer, *own)) or not hasattr(module, "gradient_checkpointing"):
            continue
        if any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        for list_name, child in module.named_children():
            if not isinstance(child, nn.ModuleList):
                continue
            for index, layer in enumerate(child):
                if not isinstance(layer, GradientCheckpointingLayer) and any(True for _ in layer.children()):
                    found.append((".".join(p for p in (name, list_name, str(index)) if p), layer))
    return found


def checkpoint_foreign_layers(model: nn.Module, enable: bool, own: tuple[type, ...] = ()) -> list[str]:
    """Checkpoint (or stop checkpointing) the layers `foreign_layers` finds; returns their names. Installing
    twice is harmless: the instance forward is set once, the flag each time."""
    names = []
    for name, layer in foreign_layers(model, own):
        if not isinstance(layer.__dict__.get("forward"), types.MethodType):
            layer.forward = types.MethodType(_checkpointed_forward, layer)
        layer.gradient_checkpointing = bool(enable)
        names.append(name)
    return names
