"""`save_lora` / `load_lora` / `LoRARequest`, as the docs' GRPO notebooks use them with vLLM.

`model.save_lora(path)` writes the adapter folder; `model.load_lora(path)` checks it against the
model and returns a `LoRARequest` holding its weights; `fast_generate(..., lora_request=...)`
then generates with that adapter instead of the model's own. The adapter is loaded into the
PEFT model once under its request's name and its weights are copied in place on later requests
(same tensors, so the engine's captured graphs stay valid); the model's own active adapter and
every parameter's `requires_grad` are restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .cache import InferenceSettings


@dataclass
class LoRARequest:
    """vLLM's record (lora_name, lora_int_id, lora_path), plus the adapter's config and weights."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    config: dict = field(default_factory=dict, repr=False)
    weights: dict = field(default_factory=dict, repr=False)


def save_lora(model, path) -> None:
    """The adapter folder of a PEFT model (adapter_config.json + adapter_model.safetensors)."""
    if not hasattr(model, "peft_config"):
        raise ValueError("save_lora: this model has no LoRA adapters; add them with FastLanguageModel.get_peft_model "
                         "(or save the whole model with save_pretrained)")
    model.save_pretrained(str(path))


_counter = [0]


def load_lora(model, path, settings: InferenceSettings | None = None) -> LoRARequest:
    """A LoRARequest for the adapter folder `path`, checked against `model` (its base and shapes)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_lora({str(path)!r}): no such folder; save an adapter there first with "
                                "model.save_lora(path)")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_lora({str(path)!r}): the folder has no adapter_config.json, so it holds no "
                                "LoRA adapter (model.save_lora writes one)")
    config = json.loads(config_file.read_text())
    rank = int(config.get("r", 0))
    max_rank = (settings or InferenceSettings()).max_lora_rank
    if rank > max_rank:
        raise ValueError(f"load_lora({str(path)!r}): the adapter has rank r={rank}, above max_lora_rank={max_rank}; "
                         f"load the model with from_pretrained(..., max_lora_rank={rank})")
    from peft import load_peft_weights

    weights = load_peft_weights(str(folder), device="cpu")
    _check_shapes(model, weights, path)
    _counter[0] += 1
    return LoRARequest(folder.name or "lora", _counter[0], str(folder), config, weights)


def _check_shapes(model, weights: dict, path) -> None:
    """Every lora_A (r, in) / lora_B (out, r) must fit the module it adapts in this model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    for key, tensor in weights.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        owner = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(owner)
        if module is None:
            raise ValueError(f"load_lora({str(path)!r}): the adapter has weights for {owner!r}, which this model "
                             "does not have: it was trained on another base model")
        layer = getattr(module, "base_layer", module)
        features = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        want = features[0] if ".lora_A." in key else features[1]
        got = tensor.shape[1] if ".lora_A." in key else tensor.shape[0]
        if want is not None and want != got:
            raise ValueError(f"load_lora({str(path)!r}): {key} has {got} features where this model's {owner} has "
                             f"{want}: the adapter was trained on another base model")


@contextlib.contextmanager
def using_lora(model, request: LoRARequest | None):
    """Generate with `request`'s adapter (None: the model as it is); yields the model to generate with."""
    if request is None:
        yield model
        return
    if not isinstance(request, LoRARequest):
        raise TypeError(f"lora_request must be what model.load_lora(path) returns, got {type(request).__name__}")
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    name = f"velotune_lora_{request.lora_int_id}"
    config = LoraConfig(**{k: v for k, v in request.config.items() if k in LoraConfig.__dataclass_fields__})
    config.inference_mode = True
    grads = {p: p.requires_grad for p in model.parameters()}
    wrapped = None
    if isinstance(model, PeftModel):
        peft = model
        previous = list(peft.base_model.active_adapters)
        if name not in peft.peft_config:
            peft.add_adapter(name, config)
    else:
        peft = wrapped = PeftModel(model, config, adapter_name=name)
        previous = None
    result = set_peft_model_state_dict(peft, request.weights, adapter_name=name)
    missing = [k for k in result.missing_keys if name in k and "lora_" in k]
    if missing:
        raise ValueError(f"the adapter in {request.lora_path} lacks weights its config describes, e.g. {missing[:2]}")
    peft.base_model.set_adapter(name)
    try:
        yield peft
    finally:
        if wrapped is not None:
            wrapped.unload()
        else:
            peft.base_model.set_adapter(previous[0] if len(previous) == 1 else previous)
        for p, flag in grads.items():
            p.requires_grad_(flag)

