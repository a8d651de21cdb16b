"""`FastVisionModel.from_pretrained`: a vision-language model through transformers' own class
(`AutoModelForImageTextToText`) and its processor, with NF4 on the text decoder.

Why transformers' classes: the vision encoders, projectors and the ways each family merges image
features into the text (Qwen's M-RoPE, Mllama's cross-attention, Gemma 3's bidirectional image
attention) are many and change between releases, and parity with transformers is then exact by
construction. Where a family's language model is one of our decoders (Qwen2-VL, Qwen2.5-VL: Qwen2
with M-RoPE; Llava / Pixtral with a Llama or Mistral text model; Mllama: Llama with transformers'
cross-attention layers kept among ours), the loaded model is adopted into velotune's class for it
(models/vision_lm.py), whose language model is our decoder over the same tensors, so training runs
the fast path there and generation the engine (Mllama's generation: transformers' loop, as the
engine does not run cross-attention).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig

from ..device import resolve_device, resolve_dtype
from ..inference import GenerationEngine, InferenceSettings
from ..inference.engine import unserved
from ..models.vision_lm import own_decoder_class
from ..quant import nf4_available, quantize_model_
from ..resolve import resolve_source, travel_name
from ..tokenizer import fix_tokenizer as fix_pad_token
from .families import family_of, kept_16bit, supported_list
from .norms import keep_tower_norms_16bit
from .processors import load_processor

logger = logging.getLogger("velotune")

CHECKPOINTING_CHOICES = (True, False, "unsloth")
INFERENCE_ARGUMENTS = ("fast_inference", "gpu_memory_utilization", "max_lora_rank", "float8_kv_cache")


def check_vision_config(config, name) -> None:
    """A text-only model is refused with the class to use instead."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = config.model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        if family_of(model_type).model_type != model_type:
            logger.warning("velotune: %r is not one of the vision families velotune was checked on (%s); loading it "
                           "through transformers' class with the common layer layout", model_type, supported_list())
        return
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "vision_config", None) is None:
        raise ValueError(f"{name} is a text-only model ({model_type!r}, no vision encoder): load it with "
                         "FastLanguageModel.from_pretrained instead of FastVisionModel")
    raise ValueError(f"{name}: transformers has no image-text-to-text class for {model_type!r}; FastVisionModel "
                     f"loads {supported_list()}")


def _nf4_runs(device, dtype) -> bool:
    ok, reason = nf4_available(device)
    if not ok:
        logger.warning("velotune: load_in_4bit=True but 4-bit NF4 cannot run here (%s); loading %s weights", reason,
                       dtype)
    return ok


def quantize_onto(model, device, skip: tuple[str, ...], dtype) -> int:
    """NF4 for the text decoder, one decoder layer at a time moved to `device` and quantized there; returns
    how many linear layers were quantized. Models without `model.language_model.layers` are moved whole
    and quantized with the same skip list."""
    try:
        layers = model.get_submodule("model.language_model.layers")
    except AttributeError:
        model.to(device)
        return len(quantize_model_(model, skip_modules=skip, compute_dtype=dtype))
    count = 0
    for layer in layers:
        layer.to(device)
        count += len(quantize_model_(layer, skip_modules=(), compute_dtype=dtype))
    return count


def from_pretrained(model_name: str | os.PathLike, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                    use_gradient_checkpointing="unsloth", device_map="sequential", token=None, revision=None,
                    trust_remote_code: bool = False, **kwargs):
    """(model, processor). `use_gradient_checkpointing` is remembered for get_peft_model."""
    from transformers import AutoModelForImageTextToText

    # The docs' vLLM arguments: the generation engine's settings where it serves the family (Qwen2-VL, Qwen2.5-VL)
    inference = {name: kwargs.pop(name) for name in INFERENCE_ARGUMENTS if name in kwargs}
    settings = InferenceSettings(**inference)  # a bad value is an error before anything loads
    kwargs.pop("load_in_8bit", None)
    kwargs.pop("full_finetuning", None)
    if kwargs:
        logger.warning("velotune: FastVisionModel.from_pretrained ignores arguments it does not use: %s",
                       sorted(kwargs))
    if use_gradient_checkpointing not in CHECKPOINTING_CHOICES or isinstance(use_gradient_checkpointing, int) \
            and not isinstance(use_gradient_checkpointing, bool):
        raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r}: allowed values are True, False "
                         "and 'unsloth'")
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    device = resolve_device(device_map)
    dtype = resolve_dtype(dtype, device)
    source = resolve_source(model_name, token=token, revision=revision)
    if (source.folder / "adapter_config.json").is_file():  # the notebooks' "lora_model": base + trainable adapter
        from ..lora.peft_model import load_adapter_model
        from .peft import VisionPeftModel

        return load_adapter_model(
            source.folder, from_pretrained, peft_class=VisionPeftModel,
            load_saved_tokenizer=lambda folder: load_processor(folder, trust_remote_code),
            max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            use_gradient_checkpointing=use_gradient_checkpointing, device_map=device_map, token=token,
            trust_remote_code=trust_remote_code)
    if source.gguf_file is not None:
        raise ValueError(f"{model_name}: FastVisionModel loads transformers folders (config.json + safetensors), "
                         "not GGUF files")
    config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    check_vision_config(config, model_name)
    processor = load_processor(source.folder, trust_remote_code)
    prequantized = getattr(config, "quantization_config", None) is not None  # a "bnb-4bit" folder
    quantize = load_in_4bit and not prequantized and _nf4_runs(device, dtype)
    # NF4: the 16-bit weights are read into host memory and each text-decoder layer is quantized on `device` as
    # it moves there, so the accelerator never holds the 16-bit text decoder (an 11B model's 21 GB would not
    # fit the 16 GB GPUs the docs' notebooks run on).
    model = AutoModelForImageTextToText.from_pretrained(
        source.folder, config=config, dtype=dtype, device_map={"": "cpu" if quantize else device},
        trust_remote_code=trust_remote_code)
    own = own_decoder_class(config)
    if own is not None:  # the language model is one of ours: it runs on velotune's decoder, same tensors
        model = own.adopt(model)
        model.generation_engine = GenerationEngine(settings, tokenizer=processor.tokenizer)  # after for_inference
        logger.info("velotune: %s's language model runs on velotune's %s decoder (the vision tower and projector "
                    "are transformers')", config.model_type, own.text_family(config))
    why = "its language model is transformers'" if own is None else unserved(model)
    for name, value in inference.items():
        if value and why is not None:
            logger.warning("velotune: %s is for velotune's generation engine, which does not serve %s (%s); "
                           "generation runs transformers' loop", name, config.model_type, why)
    if prequantized:  # transformers built bitsandbytes' layers
        from ..quant.nf4_linear import adopt_linear4bit_layers_

        adopt_linear4bit_layers_(model)  # ours compute the same on every CPU (docs/decisions.md, Loading)
    elif quantize:
        count = quantize_onto(model, device, kept_16bit(family_of(config.model_type)), dtype)
        logger.info("velotune: %d linear layers of the text decoder in NF4; the vision encoder, projector and "
                    "lm_head stay %s (vision/families.py kept_16bit says why)", count, dtype)
    model.to(device)
    keep_tower_norms_16bit(model)  # 16-bit vision activations under autocast (vision/norms.py says why)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if fix_pad_token(processor.tokenizer):
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=True)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = processor.tokenizer.pad_token_id
    model.config._name_or_path = model.name_or_path = travel_name(model_name)
    model.max_seq_length = max_seq_length
    model.velotune_checkpointing = use_gradient_checkpointing
    model.requires_grad_(False)  # adapters (get_peft_model) decide what trains
    return model.eval(), processor
