"""velotune's 4-bit layer: bitsandbytes' ``Linear4bit`` whose CPU forward is the same on every processor.

Why a subclass: bitsandbytes 0.50 repacks a ``Linear4bit``'s NF4 bytes in place, into the layout
of its AVX512-BF16 kernel, the first time the layer runs a no-grad eval forward on a CPU that has
that instruction set (an evaluation, a ``generate``, an export check). From then on the bytes are
no longer the NF4 layout that our code, PEFT merges and the "bnb-4bit" format read, the block
scales are rounded to bf16, and a later training forward runs through ``gemv_4bit``, whose input
gradient is wrong (LoRA gradients fell 10^4-fold, without an error). On a CPU without AVX512-BF16
none of this happens, so the same script trained on one machine and silently not on another.

``NF4Linear`` computes on the CPU with our exact NF4 dequantization (``quant/nf4.py``, bit-equal
to bitsandbytes' own dequantization) and a plain ``F.linear``, whatever the processor; on other
devices it is bitsandbytes' forward unchanged. Being a subclass, PEFT wraps it with its 4-bit LoRA
layer, TRL and transformers see a ``Linear4bit``, and its state dict is the bnb-4bit format.

This module imports bitsandbytes at import time; import it lazily (from the functions that build
4-bit layers), so commands that never touch 4-bit weights do not load bitsandbytes.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from velotune.quant.nf4 import dequantize_nf4_state

logger = logging.getLogger("velotune")


class NF4Linear(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (NF4) that never repacks its weight and computes exactly on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        if x.device.type != "cpu":
            return super().forward(x)
        restore_nf4_layout_(self)
        if not self.compute_type_is_set:  # bitsandbytes' rule: compute in fp32/bf16 inputs' own dtype
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype = self.compute_dtype or x.dtype
        state = self.weight.quant_state
        weight = dequantize_nf4_state(self.weight.data, state).to(dtype)  # (out, in), no grad: frozen
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)  # (..., out_features)


def restore_nf4_layout_(module: nn.Module) -> None:
    """Bring a weight that bitsandbytes repacked for its AVX512-BF16 kernel back to the NF4 layout.

    Our layers never repack; a layer that did so before velotune owned it (a model quantized and
    evaluated elsewhere) is restored with bitsandbytes' own inverse, data and quant_state together.
    The repack rounded the block scales to bf16, which the inverse cannot undo: say so once.
    """
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    weight.data = data
    weight.quant_state = state
    module.quant_state = state
    if not getattr(restore_nf4_layout_, "warned", False):
        restore_nf4_layout_.warned = True
        logger.warning(
            "a 4-bit layer had been repacked by bitsandbytes' AVX512-BF16 CPU inference path before velotune "
            "loaded it; restored to the NF4 layout (its block scales keep the bf16 rounding of that repack)"
        )


def build_nf4_linear(weight: bnb.nn.Params4bit, bias: torch.Tensor | None, compute_dtype: torch.dtype | None,
                     quant_storage: torch.dtype) -> NF4Linear:
    """An ``NF4Linear`` around an already quantized NF4 ``weight`` and ``bias``, both held as given (no copy).

    The one way velotune builds its 4-bit layer (quantizing a Linear, adopting bitsandbytes' own layer,
    loading a bnb-4bit checkpoint): built on the meta device so no throwaway weight is allocated, with
    ``quant_state`` on both the weight and the module and the weight pointing back at its module, as
    bitsandbytes expects. ``compute_dtype=None`` computes in the input's dtype (bitsandbytes' rule).
    """
    state = weight.quant_state
    if state is None or state.quant_type != "nf4":
        raise ValueError(f"an NF4Linear needs a quantized NF4 weight, got quant_state={state!r}")
    out_features, in_features = state.shape
    module = NF4Linear(
        in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
        compress_statistics=state.nested, quant_type="nf4", quant_storage=quant_storage, device="meta",
    )  # fmt: skip
    module.weight = weight
    weight.module = module
    module.quant_state = state
    if bias is not None:
        module.bias = bias
    return module


def adopt_linear4bit(module: nn.Module) -> NF4Linear:
    """An ``NF4Linear`` holding ``module``'s own weight and bias Parameters (no copy), NF4 layout restored."""
    if isinstance(module, NF4Linear):
        return module
    restore_nf4_layout_(module)
    new = build_nf4_linear(module.weight, module.bias, module.compute_dtype, module.quant_storage)
    new.compute_type_is_set = module.compute_type_is_set
    new.train(module.training)
    return new


def adopt_linear4bit_layers_(model: nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` that is not ours by an ``NF4Linear``.

    For models whose 4-bit layers transformers built (the generic loading path). Returns the count.
    """
    names = [name for name, m in model.named_modules()
             if isinstance(m, bnb.nn.Linear4bit) and not isinstance(m, NF4Linear)]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, adopt_linear4bit(getattr(parent, child_name)))
    return len(names)
