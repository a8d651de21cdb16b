"""The trained model's weights, merged, one tensor at a time, under transformers' names.

Every exporter (merged folders, GGUF files, the checks) reads weights through `plan_tensors`
and `materialize`, so none of them ever holds a second copy of the model: a `TensorPlan` is
only a name, a shape and where the pieces live; `materialize` builds that one tensor (LoRA
delta added, NF4 dequantized, Phi-3's q/k/v and gate/up fused back) when it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.spec import FamilySpec, fused_group_of
from ..quant.int8 import dequantize_int8_weight, is_linear8bit
from ..quant.linear import is_linear4bit


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: transformers' `name`, its `shape`, and the model parameters (clean
    dotted names, no PEFT wrapper parts) concatenated along dim 0 to make it."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[str, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def base_model_of(model) -> nn.Module:
    """The transformers-level model under any PEFT wrapping."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _is_saved_copy(module) -> bool:
    """PEFT's `modules_to_save` wrapper (a trained full copy beside the original)."""
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _clean(name: str) -> str | None:
    """A PEFT-wrapped parameter name -> the plain model's name; None for adapter-only tensors."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def _owner(base: nn.Module, clean_param: str) -> tuple[nn.Module, str]:
    """(outermost module at the parameter's parent path, parameter leaf name)."""
    parent, _, leaf = clean_param.rpartition(".")
    return (base.get_submodule(parent) if parent else base), leaf


def _raw_shape(module, leaf: str) -> tuple[int, ...]:
    while _is_lora_layer(module) or _is_saved_copy(module):
        module = module.base_layer if _is_lora_layer(module) else module.original_module
    if is_linear4bit(module) and leaf == "weight":
        return tuple(module.weight.quant_state.shape)
    return tuple(getattr(module, leaf).shape)


def _fused_group(base, name: str) -> tuple[str, tuple[str, ...]] | None:
    """(checkpoint name, our names) when `name` is part of a tensor the checkpoint stores fused
    (Phi-3's q/k/v and gate/up), from the family's record; models without a spec (transformers'
    own classes) already hold the checkpoint's tensors."""
    spec = getattr(base, "spec", None)
    return fused_group_of(spec, name) if isinstance(spec, FamilySpec) else None


def is_tied(base) -> bool:
    """Whether the export can leave lm_head out (tied, and neither side trained apart)."""
    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    try:
        head, _ = _owner(base, "lm_head.weight")
    except AttributeError:
        return False
    # causal LMs hold the embeddings at model.embed_tokens; vision-language models in their text decoder
    for name in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"):
        try:
            embed, _ = _owner(base, name)
            break
        except AttributeError:
            continue
    else:
        return False
    return not any(_is_saved_copy(m) or _is_lora_layer(m) for m in (head, embed))


def plan_tensors(model) -> list[TensorPlan]:
    """Every tensor of the merged checkpoint, in the model's order, without computing any."""
    base = base_model_of(model)
    tied = is_tied(base)
    names: list[str] = []
    for name, _ in base.named_parameters(remove_duplicate=False):
        clean = _clean(name)
        if clean is not None and clean not in names and not (tied and clean == "lm_head.weight"):
            names.append(clean)
    non_persistent = {f"{m}.{b}".lstrip(".") for m, mod in base.named_modules() for b in mod._non_persistent_buffers_set}
    for name, _ in base.named_buffers():
        clean = _clean(name)
        if clean is not None and clean not in names and name not in non_persistent:
            names.append(clean)
    plans: list[TensorPlan] = []
    emitted: set[str] = set()
    for clean in names:
        group = _fused_group(base, clean)
        if group is None:
            plans.append(TensorPlan(clean, _raw_shape(*_owner(base, clean)), (clean,)))
        elif group[0] not in emitted:
            fused, parts = group
            emitted.add(fused)
            shapes = [_raw_shape(*_owner(base, p)) for p in parts]
            plans.append(TensorPlan(fused, (sum(s[0] for s in shapes), *shapes[0][1:]), parts))
    return plans


def _plain_value(module, leaf: str) -> torch.Tensor:
    if is_linear4bit(module) and leaf == "weight":
        from velotune.quant import dequantize_nf4_state

        return dequantize_nf4_state(module.weight.data, module.weight.quant_state)
    if is_linear8bit(module) and leaf == "weight":  # int8 codes + row scales (load_in_8bit): the values, fp32
        return dequantize_int8_weight(module)
    if leaf == "weight" and getattr(module.weight, "dtype", None) == torch.float8_e4m3fn:  # FP8 storage (quant/fp8.py)
        return module.dequantized(torch.float32)  # the e4m3 values times their row scales
    return getattr(module, leaf).detach()


def _active_adapters(layer) -> list[str]:
    if getattr(layer, "disable_adapters", False):
        return []
    active = layer.active_adapters
    merged = set(getattr(layer, "merged_adapters", []))
    return [a for a in active if a not in merged]


def _value(module, leaf: str) -> torch.Tensor:
    """One parameter of the merged model, in float32 where arithmetic happens."""
    if _is_saved_copy(module):
        active = getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", None)]
        chosen = next((a for a in active if a in module.modules_to_save), None)
        if getattr(module, "disable_adapters", False) or chosen is None:
            return _value(module.original_module, leaf)
        return _value(module.modules_to_save[chosen], leaf)
    if not _is_lora_layer(module):
        return _plain_value(module, leaf)
    value = _value(module.base_layer, leaf)
    for adapter in _active_adapters(module):
        if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
            continue
        if module.use_dora.get(adapter, False):
            raise NotImplementedError("merging DoRA adapters is not supported by velotune's exporter yet; "
                                      "train with use_dora=False, or save the adapter with save_method='lora'")
        if leaf == "weight":
            value = value.float() + module.get_delta_weight(adapter).float()
        elif leaf == "bias" and adapter in module.lora_B and module.lora_B[adapter].bias is not None:
            value = value.float() + module.lora_B[adapter].bias.detach().float() * module.scaling[adapter]
    return value


@torch.no_grad()
def materialize(model, plan: TensorPlan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merged tensor of `plan`, on the model's device, in `dtype` (None: as computed)."""
    base = base_model_of(model)
    pieces = [_value(*_owner(base, part)) for part in plan.parts]
    out = pieces[0] if len(pieces) == 1 else torch.cat([p.float() for p in pieces], dim=0)
    out = out.reshape(plan.shape)
    return out.to(dtype) if dtype is not None and out.is_floating_point() else out


def model_dtype(model) -> torch.dtype:
    """The precision the model computes in: its floating weights', or the 4-bit layers' compute dtype."""
    base = base_model_of(model)
    for module in base.modules():
        if is_linear4bit(module):
            return module.weight.quant_state.dtype
    for p in base.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_4bit_model(model) -> bool:
    return any(is_linear4bit(m) for m in base_model_of(model).modules())
