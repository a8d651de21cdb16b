"""One small class per supported family, and the lookup from a config to its class.

The classes differ only in their `FamilySpec` and transformers config class; Phi-3 also
splits its fused checkpoint tensors on load (so LoRA can target q/k/v and gate/up separately,
like every other family) and fuses them back in `to_hf_state_dict`, both through the spec's
`fused_groups` (spec.py), which the exporters use too.
"""

from __future__ import annotations

import torch
import transformers
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from .decoder import DecoderForCausalLM
from .spec import FAMILIES, fuse_state_dict, split_state_dict


class LlamaForCausalLM(DecoderForCausalLM):
    config_class = LlamaConfig
    spec = FAMILIES["llama"]


class MistralForCausalLM(DecoderForCausalLM):
    config_class = MistralConfig
    spec = FAMILIES["mistral"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    config_class = Qwen2Config
    spec = FAMILIES["qwen2"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    config_class = Qwen3Config
    spec = FAMILIES["qwen3"]


class GemmaForCausalLM(DecoderForCausalLM):
    config_class = GemmaConfig
    spec = FAMILIES["gemma"]


class Gemma2ForCausalLM(DecoderForCausalLM):
    config_class = Gemma2Config
    spec = FAMILIES["gemma2"]


class Gemma3ForCausalLM(DecoderForCausalLM):
    config_class = Gemma3TextConfig
    spec = FAMILIES["gemma3_text"]


class Phi3ForCausalLM(DecoderForCausalLM):
    """Phi-3 with q/k/v and gate/up as separate modules; the checkpoint's fused tensors are split."""

    config_class = Phi3Config
    spec = FAMILIES["phi3"]

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self._register_load_state_dict_pre_hook(self._split_fused)

    def _split_fused(self, state_dict, prefix, *args, **kwargs) -> None:
        split_state_dict(self.spec, self.config, state_dict, prefix)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader does not run load hooks, so it cannot split the fused tensors:
        load through transformers' Phi-3 and take its weights."""
        reference = transformers.Phi3ForCausalLM.from_pretrained(*args, **kwargs)
        model = cls(reference.config)
        model.load_state_dict(reference.state_dict())
        return model.to(device=reference.device, dtype=reference.dtype).train(reference.training)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save under transformers' fused names, so transformers' Phi-3 loads the folder."""
        kwargs.setdefault("state_dict", self.to_hf_state_dict())
        return super().save_pretrained(save_directory, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """LongRoPE switches every position to its long factors once the sequence passes the
        original length, so keys cached with the short factors are stale: at that step, drop the
        cache and run the whole sequence again (as transformers' Phi-3 does)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        params = self.config.rope_parameters or {}
        if params.get("rope_type") != "longrope":
            return inputs
        original = params.get("original_max_position_embeddings", self.config.max_position_embeddings)
        name = "cache" if "cache" in inputs else "past_key_values"
        cache = inputs.get(name)
        if cache is not None and input_ids.shape[1] > original >= cache.get_seq_length() > 0:
            inputs["input_ids"] = input_ids
            inputs["position_ids"] = None
            inputs[name] = DynamicCache(config=self.config)
        return inputs

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        return fuse_state_dict(self.spec, super().to_hf_state_dict())


MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    cls.spec.model_type: cls
    for cls in (
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        GemmaForCausalLM,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Phi3ForCausalLM,
    )
}
# Gemma 3 multimodal checkpoints name their text part "gemma3"; text-only ones "gemma3_text".
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(MODEL_CLASSES)


def model_class_for(config: PretrainedConfig) -> type[DecoderForCausalLM]:
    """Our class for a transformers config; ValueError naming the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    try:
        return MODEL_CLASSES[model_type]
    except KeyError:
        raise ValueError(
            f"velotune has no own implementation of model_type {model_type!r}; "
            f"supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
