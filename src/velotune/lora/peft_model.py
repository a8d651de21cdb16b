"""LoRA through PEFT: `get_peft_model` with the Unsloth API's arguments, checked loudly, and reloading
of saved adapter folders.

The returned model is a real `peft.PeftModelForCausalLM` (our subclass), so TRL and
transformers treat it as a PEFT model: adapters are saved as PEFT folders, and preference/RL
trainers disable the adapter for the reference model instead of copying the model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, load_peft_weights, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from ..fast.plan import RuntimeSettings, find_decoder
from ..models.decoder import DecoderModel
from ..models.foreign_checkpoints import checkpoint_foreign_layers, offload_foreign_layers
from ..models.tower_lora import install_fused_linears
from ..quant.linear import is_linear4bit

logger = logging.getLogger("velotune")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Named in target_modules by the docs' continued-pretraining page; they train fully (modules_to_save).
FULLY_TRAINED = ("lm_head", "embed_tokens")
BIAS_CHOICES = ("none", "all", "lora_only")
CHECKPOINTING_CHOICES = (True, False, "unsloth")


class VelotunePeftModel(PeftModelForCausalLM):
    """PEFT's causal-LM wrapper; velotune's export and generation methods live here as they land."""

    def __init__(self, model, peft_config, *args, **kwargs):
        # PEFT's constructor reads `model.is_gradient_checkpointing`, which transformers 5.2x deprecated:
        # one FutureWarning per model, about a call that is not the user's. Silenced here only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            super().__init__(model, peft_config, *args, **kwargs)
        decoder = find_decoder(self)
        for index in getattr(decoder, "borrowed_layers", ()):  # transformers' layers among ours (Mllama's cross
            install_fused_linears(decoder.layers[index], decoder.runtime)  # attention): their LoRA fused too

    @property
    def max_seq_length(self) -> int | None:
        return getattr(self.get_base_model(), "max_seq_length", None)

    def generate(self, *args, **kwargs):
        """PEFT's generate, also given a tokenizer's BatchEncoding as `inputs`/`input_ids` (the docs'
        inference cell on transformers 5; models/generation.py), whatever the base model's class."""
        from ..inference import engine_of
        from ..models.generation import unpack_generate_inputs

        args, kwargs = unpack_generate_inputs(args, kwargs)
        # After FastLanguageModel.for_inference, velotune's engine runs it (inference/api.py).
        return engine_of(self).generate(self, super().generate, *args, **kwargs)

    # Generation as the docs' GRPO notebooks call it (vLLM's API; velotune's engine, inference/).
    def fast_generate(self, *args, **kwargs):
        from ..inference import engine_of

        return engine_of(self).fast_generate(self, *args, **kwargs)

    def save_lora(self, save_directory) -> None:
        from ..inference import engine_of

        engine_of(self).save_lora(self, save_directory)

    def load_lora(self, save_directory, load_tensors: bool = True):
        from ..inference import engine_of

        return engine_of(self).load_lora(self, save_directory)

    def save_pretrained(self, save_directory, safe_serialization=True, **kwargs):
        """PEFT's save_pretrained, always as safetensors (models/saving.py: the docs' None means safetensors)."""
        from ..export.folders import file_states, save_failure
        from ..models.saving import safetensors_only

        if kwargs.get("state_dict") is None:  # the trainer's gathered save of a sharded model passes its state
            refuse_sharded(self, "save_pretrained")

        safe = safetensors_only(safe_serialization, "the LoRA adapter")
        before = file_states(Path(save_directory))
        try:
            return super().save_pretrained(save_directory, safe_serialization=safe, **kwargs)
        except Exception as error:  # a full disk or the file-size limit: PEFT's error does not name the file
            named = save_failure(Path(save_directory), before, error, "The adapter in this folder is incomplete; "
                                 "make room and save it again", "save it where larger files are allowed",
                                 "save_directory", weights=("adapter_model.safetensors",))
            if named is None:
                raise
            raise named from error

    # Export (velotune.export): the Unsloth API's methods, delegating to functions that take the model.
    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        from ..export import save_pretrained_merged

        refuse_sharded(self, "save_pretrained_merged")
        return save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="fast_quantized", **kwargs):
        from ..export import save_pretrained_gguf

        refuse_sharded(self, "save_pretrained_gguf")
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method=quantization_method,
                                    **kwargs)

    def save_pretrained_ollama(self, save_directory, tokenizer=None, quantization_method="q4_k_m", **kwargs):
        from ..export import save_pretrained_ollama

        refuse_sharded(self, "save_pretrained_ollama")
        return save_pretrained_ollama(self, save_directory, tokenizer, quantization_method=quantization_method,
                                      **kwargs)

    def push_to_hub_merged(self, repo_id, tokenizer=None, save_method="merged_16bit", token=None, **kwargs):
        from ..export import push_to_hub_merged

        refuse_sharded(self, "push_to_hub_merged")
        return push_to_hub_merged(self, repo_id, tokenizer, save_method=save_method, token=token, **kwargs)

    def push_to_hub_gguf(self, repo_id, tokenizer=None, quantization_method="fast_quantized", token=None, **kwargs):
        from ..export import push_to_hub_gguf

        refuse_sharded(self, "push_to_hub_gguf")
        return push_to_hub_gguf(self, repo_id, tokenizer, quantization_method=quantization_method, token=token,
                                **kwargs)


def refuse_sharded(model, what: str) -> None:
    """A model sharded by FSDP2 (`fsdp=True`) holds only this rank's part of each weight: saving or exporting
    it from here would write parts. The error says what to do instead."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"{what}: this model is sharded over the ranks (fsdp=True), so this process holds only its part of "
            "each weight. Call trainer.save_model(DIR) on every rank (rank 0 writes the whole adapter or model into "
            "DIR), or run `velotune consolidate CHECKPOINT DIR`; then load DIR with FastLanguageModel.from_pretrained "
            "to export it")


def _linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            or is_linear4bit(m) or type(m).__name__ == "Linear8bitLt"]


def _linear_leaf_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in _linear_names(model)}


def _validate(model, r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing, max_seq_length):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer (typical: 8, 16, 32, 64, 128)")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r}: must be a finite positive number (commonly equal to r or 2*r)")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout={lora_dropout!r}: must be in [0, 1) (0 is the optimized setting)")
    if bias not in BIAS_CHOICES:
        raise ValueError(f"bias={bias!r}: allowed values are {', '.join(map(repr, BIAS_CHOICES))}")
    if use_gradient_checkpointing not in CHECKPOINTING_CHOICES or isinstance(use_gradient_checkpointing, int) and \
            not isinstance(use_gradient_checkpointing, bool):
        raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r}: allowed values are "
                         "True, False and 'unsloth'")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        raise ValueError(f"max_seq_length={max_seq_length!r}: must be a positive integer")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"target_modules={target_modules!r}: pass a list of module names or 'all-linear'")
        return
    available = _linear_leaf_names(model) | set(FULLY_TRAINED)
    # full dotted names too (FastVisionModel selects layers by where they sit, not by leaf name)
    available |= set(_linear_names(model))
    unknown = [t for t in target_modules if t not in available]
    if unknown:
        raise ValueError(f"target_modules has names this model does not have: {unknown}; "
                         f"its linear layers are {sorted(_linear_leaf_names(model))}, "
                         f"plus {list(FULLY_TRAINED)} for full training")


def get_peft_model(
    model,
    r: int = 16,
    target_modules=DEFAULT_TARGETS,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    layers_to_transform=None,
    layers_pattern=None,
    use_gradient_checkpointing=True,
    random_state: int = 3407,
    max_seq_length: int | None = None,
    use_rslora: bool = False,
    modules_to_save=None,
    init_lora_weights=True,
    loftq_config=None,
    temporary_location: str | None = None,
    *,
    peft_class: type[VelotunePeftModel] = VelotunePeftModel,
    **kwargs,
):
    """Attach LoRA adapters (the Unsloth API's `FastLanguageModel.get_peft_model`). `peft_class`: the wrapper
    returned (FastVisionModel passes its subclass, whose export methods know vision models)."""
    if kwargs:
        logger.warning("velotune: ignoring get_peft_model arguments it does not use: %s", sorted(kwargs))
    if isinstance(model, PeftModel):
        config = getattr(model, "peft_config", {}).get("default")
        settings = f" (r={config.r}, lora_alpha={config.lora_alpha})" if config is not None else ""
        raise ValueError(f"this model already has LoRA adapters{settings}: get_peft_model was called on it before, "
                         "or it was loaded from an adapter folder. It trains as it is: pass it to the trainer without "
                         "calling get_peft_model again; for other LoRA settings reload the base model with "
                         "FastLanguageModel.from_pretrained and call get_peft_model once")
    injected = next((name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)), None)
    if injected is not None:
        raise ValueError(f"this model already holds LoRA layers ({injected}): an earlier get_peft_model call added "
                         "them to it in place. Use the model that call returned (it trains as it is), or reload "
                         "the base model with FastLanguageModel.from_pretrained to start over with new settings")
    if getattr(model, "_velotune_full_finetuning", False):
        logger.warning("velotune: the model was loaded with full_finetuning=True; every weight trains, so no "
                       "adapters are added")
        return model
    target_modules = list(target_modules) if not isinstance(target_modules, str) else target_modules
    _validate(model, r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing, max_seq_length)
    modules_to_save = list(modules_to_save or [])
    if not isinstance(target_modules, str):
        for name in FULLY_TRAINED:
            if name in target_modules:
                target_modules.remove(name)
                modules_to_save.append(name)
    if loftq_config:
        if any(is_linear4bit(m) for m in model.modules()):
            raise ValueError("loftq_config needs the 16-bit weights: load the model with load_in_4bit=False "
                             "(LoftQ itself initialises the adapters from a 4-bit approximation)")
        init_lora_weights = "loftq"
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, target_modules=target_modules,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_rslora=use_rslora,
        modules_to_save=modules_to_save or None, init_lora_weights=init_lora_weights,
        loftq_config=loftq_config or {}, task_type="CAUSAL_LM",
    )
    _seed(random_state)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    _set_checkpointing(model, use_gradient_checkpointing)
    return peft_class(model, config)


def _seed(random_state: int) -> None:
    """Same adapters for the same random_state, whatever ran before."""
    random.seed(random_state)
    torch.manual_seed(random_state)


def _set_checkpointing(model, mode) -> None:
    """Checkpoint each decoder layer (frozen embeddings need no grad hooks).

    Our models take the mode directly (transformers has renamed its toggle across 5.x): on the fast
    path both True and "unsloth" run fast/checkpointing.py's reentrant-style function, "unsloth"
    also parking each layer's input in pinned CPU memory until backward needs it; elsewhere torch's
    non-reentrant checkpoint. The generic path uses whichever toggle the installed
    transformers has; under "unsloth" transformers' layers (vision towers,
    the generic path's decoder) offload their inputs too (models/foreign_checkpoints.py TowerCheckpoint).
    """
    decoder = getattr(model, "model", None)
    if isinstance(decoder, DecoderModel):
        decoder.set_checkpointing(mode)
    else:
        if mode:  # transformers' modules: the generic path, or a vision model's tower
            # Layers transformers' toggle flags but never checkpoints (Mllama's vision encoders), first, so that
            # the toggle below sets their flag as it sets the others
            checkpoint_foreign_layers(model, True, own=(DecoderModel,))
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name, with its own keyword
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        own = find_decoder(model)  # our decoder as a composite model's language model (Qwen2-VL)
        if own is not None:
            own.set_checkpointing(mode)  # after transformers' toggle: "unsloth" offloads there too
        if mode:  # "unsloth": transformers' layers (vision towers) offload their inputs as ours do
            settings = None if mode != "unsloth" else own.runtime if own is not None else RuntimeSettings()
            offload_foreign_layers(model, settings, own=(DecoderModel,))
    if mode:
        model.config.use_cache = False


def load_adapter_model(folder: Path, load_base, *, peft_class: type[VelotunePeftModel] = VelotunePeftModel,
                       load_saved_tokenizer=None, **base_kwargs):
    """A saved adapter folder -> (base + trainable adapter, tokenizer), like the docs'
    "Loading LoRA adapters for continued finetuning". `load_saved_tokenizer(folder)` reads the tokenizer
    (or processor) saved beside the adapter (default: AutoTokenizer); `peft_class` as in get_peft_model."""
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    base_name = adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{folder / 'adapter_config.json'} does not name its base model (base_model_name_or_path)")
    model, tokenizer = load_base(base_name, **base_kwargs)
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        if load_saved_tokenizer is None:
            from transformers import AutoTokenizer

            load_saved_tokenizer = AutoTokenizer.from_pretrained
        saved = load_saved_tokenizer(folder)
        size = len(getattr(saved, "tokenizer", saved))  # a processor's size is its tokenizer's
        if size != len(getattr(tokenizer, "tokenizer", tokenizer)):
            model.resize_token_embeddings(size)
        tokenizer = saved
    _set_checkpointing(model, True)
    config = LoraConfig.from_pretrained(folder)
    config.inference_mode = False
    peft_model = peft_class(model, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device=str(model.device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{folder} does not hold every adapter weight its config describes, e.g. {missing[:3]}")
    return peft_model, tokenizer
