"""Swap ``nn.Linear`` layers for 4-bit layers (``NF4Linear``, a bitsandbytes ``Linear4bit``) holding our NF4.

Why bitsandbytes' module classes: PEFT wraps ``bnb.nn.Linear4bit`` with its own LoRA layer,
TRL and transformers recognise it (``is_loaded_in_4bit`` paths, k-bit training prep), and its
state dict is the "bnb-4bit" checkpoint format. We replace *how* the weights are quantized
(``quantize_nf4``) and, through our subclass ``NF4Linear``, how they compute on the CPU (see
``nf4_linear.py`` for why), never bitsandbytes' classes or functions themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from velotune.quant.nf4 import quantize_nf4


def to_linear4bit(
    linear: nn.Linear,
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
):
    """An ``NF4Linear`` (a ``bnb.nn.Linear4bit``) with ``linear``'s weight quantized and its bias kept.

    The result lives on ``linear``'s device, is already quantized (``bnb_quantized=True``, so
    moving it never re-quantizes), and its ``quant_state`` is attached to both the weight and
    the module, as bitsandbytes expects. ``compute_dtype=None`` computes in the weight's dtype.
    """
    import bitsandbytes as bnb

    from velotune.quant.nf4_linear import build_nf4_linear

    weight = linear.weight.detach()  # (out, in)
    packed, state = quantize_nf4(weight, blocksize, compress_statistics, quant_storage)
    params = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize,
        compress_statistics=compress_statistics, quant_type="nf4", quant_storage=quant_storage, bnb_quantized=True,
    )  # fmt: skip
    # linear.bias is kept as the same Parameter: no copy, trainability unchanged.
    module = build_nf4_linear(params, linear.bias, compute_dtype or weight.dtype, quant_storage)
    module.train(linear.training)
    return module


def is_linear4bit(module) -> bool:
    """Whether ``module`` is bitsandbytes' ``Linear4bit`` or a subclass (ours), without importing bitsandbytes."""
    return is_bitsandbytes_class(type(module), "Linear4bit")


@functools.cache
def is_bitsandbytes_class(cls: type, name: str) -> bool:
    """Whether ``cls`` is bitsandbytes' class ``name`` or a subclass of it, by name (no bitsandbytes import). Cached
    per class: the fast path's plan asks it of every projection on every forward."""
    return any(c.__name__ == name and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


def _skipped(name: str, skip_modules: Iterable[str]) -> bool:
    """True when a skip pattern is one or more whole dotted components of ``name``.

    "lm_head" skips "lm_head"; "vision_tower" skips "model.vision_tower.blocks.0.fc1";
    "mlp.gate" skips "model.layers.3.mlp.gate" but not "model.layers.3.mlp.gate_proj".
    """
    dotted = f".{name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in skip_modules)


def quantize_model_(
    model: nn.Module,
    skip_modules: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    within: str = "",
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an NF4 ``Linear4bit``; return their names.

    One layer at a time: each fp weight is quantized and its module dropped before the next, so
    peak memory is the 4-bit model plus a single fp layer (unless something else still holds a
    reference to the old weight, e.g. a weight tied to a skipped module). ``within`` (a submodule's
    dotted name) limits the swap to that submodule while names and ``skip_modules`` stay the whole
    model's: the streaming loader (models/stream_load.py) quantizes each decoder layer as it arrives.
    """
    skip_modules = tuple(skip_modules)
    names = [
        name
        for name, module in model.get_submodule(within).named_modules(prefix=within)
        if isinstance(module, nn.Linear)
        and not is_linear4bit(module)
        and not _skipped(name, skip_modules)
    ]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child_name)
        setattr(parent, child_name, to_linear4bit(old, compute_dtype, compress_statistics))
        old.weight = None  # release our reference to the fp weight now, not at the end
        del old
    return names
