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

`use_gradient_checkpointing="unsloth"` offloads the towers' layer inputs too (`TowerCheckpoint`, installed by
`offload_foreign_layers`): measured on the H200 (BENCHMARKS.md, session 14), torch's checkpoint kept 39 x 63 MiB of
Mllama-11B vision-layer inputs (2.4 GiB, fp32 under autocast: the encoder's layer norms) and 31 x 4.9 MiB of
Qwen2.5-VL-7B's on the GPU, where Unsloth keeps bf16 ones (Mllama) or offloads them (Qwen).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..fast.checkpointing import LayerCheckpointer, plain_checkpoint
from ..fast.plan import RuntimeSettings, uses_torch_checkpoint


def _checkpointed_forward(self, *args, **kwargs):
    """The class's forward, checkpointed while the instance's flag is on and it trains with grad (through the
    instance's `TowerCheckpoint` when "unsloth" installed one, else torch's non-reentrant checkpoint). Hidden
    states given by keyword (Mllama's `hidden_state=`) become the first positional argument, which an offloading
    checkpoint keeps."""
    if not args:  # the forward's first parameter, or transformers' other spelling of it (Mllama's encoder passes
        # `hidden_state=` to a forward whose parameter became `hidden_states`, through a deprecation wrapper)
        names = (_first_parameter(type(self).forward), "hidden_states", "hidden_state")
        first = next((k for k in names if k in kwargs), None)
        if first is not None:
            args = (kwargs.pop(first),)
    forward = functools.partial(type(self).forward, self, **kwargs)
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return getattr(self, "_velotune_checkpoint", plain_checkpoint)(forward, *args)
    return forward(*args)


@functools.lru_cache(maxsize=None)
def _first_parameter(forward) -> str | None:
    names = list(inspect.signature(forward).parameters)
    return names[1] if len(names) > 1 else None


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


# True while TowerCheckpoint's recomputation of a layer runs (in backward; the engine's thread runs the whole call).
_RECOMPUTING = contextvars.ContextVar("velotune_tower_recomputing", default=False)


def recomputing() -> bool:
    """Whether the current call is a tower layer's recomputation under `TowerCheckpoint`, whose output only gets
    differentiated: an MLP that knows how its output is consumed may return it unset (tower_lora.py)."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recomputation():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


class _NotATensor(Exception):
    """A checkpointed layer returned something other than one tensor (the offloading function carries one)."""


class TowerCheckpoint:
    """The checkpoint function of transformers' layers under `use_gradient_checkpointing="unsloth"`: each layer's
    input goes to pinned host memory on a side stream and comes back for its recomputation in backward, as our
    decoders' layers do (fast/checkpointing.py's LayerCheckpointer, which also prefetches the previous layer's input
    while this one recomputes). Called as transformers calls its `_gradient_checkpointing_func`:
    `(function, hidden, *args)`, the keyword arguments bound in `function`.

    It falls back to torch's non-reentrant checkpoint where offloading would be wrong or does not pay: an input
    other than the first that needs a gradient (the reentrant-style function returns none for it), a layer that
    returns more than one tensor (remembered per layer class after its first call), a micro-batch below
    `settings.offload_min_tokens` rows, a tensor off CUDA (unless `settings.offload_on_cpu`, how tests run it), and
    DDP (`settings.torch_checkpoint`, as plan.py decides for our layers). `settings` are the model's decoder's
    RuntimeSettings when it has one of ours, so one threshold serves both."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self.checkpointer = LayerCheckpointer()
        self.plain_classes: set[type] = set()

    def __call__(self, function, *args, **kwargs):
        layer = _layer_of(function)
        if not self._offloads(function, layer, args, kwargs):
            return plain_checkpoint(function, *args, **kwargs)
        call = functools.partial(function, **kwargs) if kwargs else function

        def single(hidden, *rest):
            out = call(hidden, *rest)
            if not isinstance(out, torch.Tensor):
                raise _NotATensor
            return out

        def recompute(hidden, *rest):
            with _recomputation():
                return single(hidden, *rest)

        try:
            return self.checkpointer(single, args[0], *args[1:], offload=True, recompute=recompute)
        except _NotATensor:
            self.plain_classes.add(type(layer))
            return plain_checkpoint(function, *args, **kwargs)

    def _offloads(self, function, layer, args, kwargs) -> bool:
        settings = self.settings
        if not args or not isinstance(args[0], torch.Tensor) or type(layer) in self.plain_classes:
            return False
        hidden = args[0]
        if not (hidden.is_cuda or settings.offload_on_cpu) or hidden.numel() // max(hidden.shape[-1], 1) < \
                settings.offload_min_tokens:
            return False
        if uses_torch_checkpoint(settings):  # DDP: the same decision as for our layers
            return False
        others = (args[1:], kwargs, getattr(function, "keywords", {}))
        return not any(t.requires_grad for t in _tensors(others))


def _layer_of(function):
    """The layer a checkpointed call runs: transformers binds it as `partial(forward, layer, **kwargs)` (5.2x) or
    `partial(layer.__call__, **kwargs)` (5.17); ours as the former."""
    if isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        return getattr(function.func, "__self__", None)
    return getattr(function, "__self__", None)


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


def offload_foreign_layers(model: nn.Module, settings: RuntimeSettings | None, own: tuple[type, ...] = ()) -> int:
    """Give transformers' checkpointed layers outside our decoders (`GradientCheckpointingLayer`s and the layers
    `foreign_layers` finds) one `TowerCheckpoint` over `settings`; returns how many. Call after transformers'
    toggle, which sets `_gradient_checkpointing_func` on each layer (an instance attribute: we replace that, not
    the class). `settings=None` takes the foreign layers back to torch's checkpoint (the toggle resets the rest)."""
    tower = TowerCheckpoint(settings) if settings is not None else None
    skipped = [name for name, module in model.named_modules() if isinstance(module, own)]
    count = 0
    for name, module in model.named_modules():
        if tower is None or not isinstance(module, GradientCheckpointingLayer) or \
                any(name.startswith(s + ".") for s in skipped):
            continue
        module._gradient_checkpointing_func = tower
        count += 1
    for _, layer in foreign_layers(model, own):
        if tower is None:
            layer.__dict__.pop("_velotune_checkpoint", None)
        else:
            layer._velotune_checkpoint = tower
            count += 1
    return count
