"""8-bit weights (`load_in_8bit=True`): bitsandbytes' LLM.int8 layers, and reading their weights back.

Why bitsandbytes' own ``Linear8bitLt`` unchanged: PEFT wraps it with its 8-bit LoRA layer, and its int8
matmul with fp16 outlier columns (threshold 6.0, transformers' default for ``load_in_8bit``) is the method
users ask for by that name. What velotune adds is the way back: an exporter that reads ``weight`` of such
a layer gets int8 codes, so merged and GGUF exports dequantize through ``dequantize_int8_weight``.

Layout (bitsandbytes >= 0.45): once the layer is on its device, ``weight.data`` holds the int8 codes
(out, in) and ``weight.SCB`` each row's absmax in fp32 (out,); value = code * absmax / 127. The first
forward moves the row scales to ``module.state.SCB`` and sets ``weight.SCB`` to None, so the codes alone
read as values 127/absmax times too large: the scales are looked up in both places.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from velotune.quant.linear import _skipped, is_bitsandbytes_class

_INV_127 = 7.874015718698502e-3  # bitsandbytes multiplies by this fp32 reciprocal rather than dividing


def is_linear8bit(module) -> bool:
    """Whether ``module`` is bitsandbytes' ``Linear8bitLt`` (or a subclass), without importing bitsandbytes."""
    return is_bitsandbytes_class(type(module), "Linear8bitLt")


def dequantize_int8_weight(module) -> torch.Tensor:
    """The fp32 values of a ``Linear8bitLt``'s weight: (out, in). A weight not quantized yet (before its
    first move to a device) is returned as it is, in fp32."""
    weight = module.weight
    if weight.dtype != torch.int8:
        return weight.detach().float()
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError("an int8 weight without its row scales (weight.SCB and state.SCB are both None)")
    return weight.detach().float() * scb.float().unsqueeze(1) * _INV_127  # (out, in) * (out, 1)


def quantize_model_int8_(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",),
                         threshold: float = 6.0, within: str = "") -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``Linear8bitLt`` on the Linear's device; return
    the names. The weights are quantized by bitsandbytes as each layer moves to that device. ``within``: only
    that submodule's Linears (full names; see quant/linear.py's ``quantize_model_``)."""
    import bitsandbytes as bnb

    skip_modules = tuple(skip_modules)
    names = [name for name, m in model.get_submodule(within).named_modules(prefix=within)
             if type(m) is nn.Linear and not _skipped(name, skip_modules)]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child_name)
        layer = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(old.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        if old.bias is not None:
            layer.bias = old.bias
        setattr(parent, child_name, layer.to(old.weight.device))
        old.weight = None  # one 16-bit layer at a time
    return names
