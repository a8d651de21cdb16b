"""`FastVisionModel.get_peft_model`: LoRA on the layer groups the four switches choose, through
velotune's LoRA bookkeeping (lora/peft_model.py) with the layers named in full.

The switches cross two ways: which tower (vision layers: the vision encoder and its projector;
language layers: the text decoder) and which kind of layer (attention projections, MLP layers).
A layer trains when both its tower and its kind are on. The chosen layers are logged as patterns
(layer indices folded), and a choice that selects nothing is an error.
"""

from __future__ import annotations

import logging
import re

import torch

from ..lora.peft_model import VelotunePeftModel
from ..lora.peft_model import get_peft_model as lora_get_peft_model
from ..quant.linear import is_linear4bit
from .families import ATTENTION, LANGUAGE, MLP, VISION, family_of, group_of

logger = logging.getLogger("velotune")


class VisionPeftModel(VelotunePeftModel):
    """The LoRA model of a vision-language model: merged saves are checked with images; GGUF writes the language
    model and the mmproj projector file (vision/export.py); Ollama is refused."""

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        from .export import save_pretrained_merged

        return save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="fast_quantized", **kwargs):
        from .export import save_pretrained_gguf

        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method=quantization_method,
                                    **kwargs)

    def save_pretrained_ollama(self, save_directory, tokenizer=None, quantization_method="q4_k_m", **kwargs):
        from .export import refuse_gguf

        refuse_gguf(self, "Ollama export")

    def push_to_hub_gguf(self, repo_id, tokenizer=None, quantization_method="fast_quantized", token=None, **kwargs):
        from .export import push_to_hub_gguf

        return push_to_hub_gguf(self, repo_id, tokenizer, quantization_method=quantization_method, token=token,
                                **kwargs)


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_linear4bit(module)


def select_layers(model, finetune_vision_layers: bool = True, finetune_language_layers: bool = True,
                  finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True) -> list[str]:
    """The full names of the linear layers the four switches select, in the model's order."""
    family = family_of(model.config.model_type)
    towers = {VISION} if finetune_vision_layers else set()
    towers |= {LANGUAGE} if finetune_language_layers else set()
    kinds = {ATTENTION} if finetune_attention_modules else set()
    kinds |= {MLP} if finetune_mlp_modules else set()
    chosen = []
    for name, module in model.named_modules():
        if _is_linear(module):
            group = group_of(name, family)
            if group.component in towers and group.kind in kinds:
                chosen.append(name)
    return chosen


def fold(names: list[str]) -> list[str]:
    """`a.layers.0.q` .. `a.layers.3.q` -> `a.layers.{0-3}.q`; `m.0`, `m.2` -> `m.{0,2}` (for the log)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        numbers = re.findall(r"\.(\d+)\.", f".{name}.")
        key = re.sub(r"\.\d+\.", ".{}.", f".{name}.").strip(".")
        groups.setdefault(key, []).append(int(numbers[0]) if len(numbers) == 1 else -1)
    out = []
    for key, numbers in groups.items():
        if "{}" in key and key.count("{}") == 1 and -1 not in numbers:
            numbers = sorted(set(numbers))
            contiguous = len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1))
            span = f"{numbers[0]}-{numbers[-1]}" if contiguous else ",".join(map(str, numbers))
            out.append(key.replace("{}", "{" + span + "}"))
        else:
            out.extend(n for n in names if re.sub(r"\.\d+\.", ".{}.", f".{n}.").strip(".") == key)
    return out


def get_peft_model(model, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                   finetune_vision_layers: bool = True, finetune_language_layers: bool = True,
                   finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                   target_modules=None, use_gradient_checkpointing=None, random_state: int = 3407,
                   use_rslora: bool = False, loftq_config=None, **kwargs):
    """LoRA on the chosen groups (all four on by default, as in the docs). `target_modules`, when given,
    replaces the switches (names as in FastLanguageModel.get_peft_model). `use_gradient_checkpointing`
    defaults to what from_pretrained was given."""
    switches = {"finetune_vision_layers": finetune_vision_layers, "finetune_language_layers": finetune_language_layers,
                "finetune_attention_modules": finetune_attention_modules, "finetune_mlp_modules": finetune_mlp_modules}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: must be True or False")
    if target_modules is None:
        target_modules = select_layers(model, **switches)
        if not target_modules:
            on = [k for k, v in switches.items() if v] or ["none"]
            raise ValueError(f"get_peft_model selects no layer: with {', '.join(on)} switched on there is no "
                             "(tower, kind) pair to train; turn on at least one of finetune_vision_layers / "
                             "finetune_language_layers AND one of finetune_attention_modules / finetune_mlp_modules")
        logger.info("velotune: LoRA on %d layers: %s", len(target_modules), "; ".join(fold(target_modules)))
    if use_gradient_checkpointing is None:
        use_gradient_checkpointing = getattr(model, "velotune_checkpointing", "unsloth")
    return lora_get_peft_model(model, r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout, bias=bias,
                               use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                               use_rslora=use_rslora, loftq_config=loftq_config, peft_class=VisionPeftModel, **kwargs)
