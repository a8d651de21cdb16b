"""`FastLanguageModel`: the Unsloth API's entry points (from_pretrained, get_peft_model,
for_inference, for_training) over velotune's own model classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from . import settings
from .device import resolve_device, resolve_dtype
from .inference import GenerationEngine, InferenceSettings, release
from .kernels import set_fast_launch
from .lora.peft_model import get_peft_model, load_adapter_model
from .models import SUPPORTED_MODEL_TYPES, model_class_for
from .quant import dequantize_nf4_state, load_prequantized, nf4_available, quantize_model_
from .resolve import Source, resolve_source, travel_name
from .tokenizer import fix_tokenizer as fix_pad_token
from .checkpoint_shards import check_finite, iter_shards

logger = logging.getLogger("velotune")


def fixture_cache() -> Path:
    """Where the bundled fixture model is converted once (`VELOTUNE_CACHE`/fixtures; settings.py)."""
    return settings.current().cache_dir / "fixtures"


class FastLanguageModel:
    """Namespace of the Unsloth API's model functions; never instantiated."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike = "HuggingFaceTB/SmolLM2-135M-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map="sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        revision: str | None = None,
        **kwargs,
    ):
        """Load (model, tokenizer). See README for the sources and the precision rules."""
        engine = _generation_engine(kwargs)
        if kwargs:
            logger.warning("velotune: ignoring from_pretrained arguments it does not use: %s", sorted(kwargs))
        _check_positive("max_seq_length", max_seq_length)
        # kernels/ reads no velotune module: the Triton launch switch is pushed to it here (and by each step's plan).
        set_fast_launch(settings.current().triton_fast_launch)
        device = resolve_device(device_map)
        dtype = resolve_dtype(dtype, device)
        source = resolve_source(model_name, token=token, revision=revision)
        if (source.folder / "adapter_config.json").is_file() and source.gguf_file is None:
            model, tokenizer = load_adapter_model(
                source.folder, FastLanguageModel.from_pretrained, max_seq_length=max_seq_length, dtype=dtype,
                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, token=token, device_map=device_map,
                rope_scaling=rope_scaling, fix_tokenizer=fix_tokenizer, trust_remote_code=trust_remote_code)
            engine.tokenizer = tokenizer
            model.get_base_model().generation_engine = engine
            return model, tokenizer
        if full_finetuning and (load_in_4bit or load_in_8bit):
            logger.warning("velotune: full_finetuning=True trains every weight, so the model loads in %s, "
                           "not 4/8-bit", dtype)
            load_in_4bit = load_in_8bit = False
        quant = _quantization_mode(load_in_4bit, load_in_8bit, device)
        if source.fixture is not None:
            source = _converted_fixture(source)

        config = _load_config(source, trust_remote_code)
        _apply_rope_scaling(config, max_seq_length, rope_scaling)
        cls = _model_class(config, trust_remote_code)
        tokenizer = _load_tokenizer(source, trust_remote_code)
        if cls is None:
            model = _load_generic(source, config, dtype, device, quant, trust_remote_code)
        else:
            model = _load_own(cls, source, config, dtype, device, quant)
        if device.type == "cuda":
            # Loading holds 16-bit shards while it quantizes; the allocator would keep that transient
            # reserved for the whole run (8B NF4 measured: 18.1 GiB reserved for a 7.7 GiB training peak).
            torch.cuda.empty_cache()
        if fix_tokenizer and fix_pad_token(tokenizer):
            _grow_embeddings(model, len(tokenizer))
        for cfg in (model.config, model.generation_config):
            cfg.pad_token_id = tokenizer.pad_token_id
        # The name that travels (adapter_config.json, model cards, GGUF general.name): what the user
        # loaded ("org/name"), never the cache or fixture folder it was read from on this machine.
        model.config._name_or_path = model.name_or_path = travel_name(model_name)  # PEFT reads the attribute
        model.max_seq_length = max_seq_length
        engine.tokenizer = tokenizer
        model.generation_engine = engine  # fast_generate, save_lora/load_lora, generate after for_inference
        model._velotune_full_finetuning = full_finetuning
        if full_finetuning:
            model.requires_grad_(True)
        else:
            model.requires_grad_(False)  # adapters (get_peft_model) decide what trains
        return model, tokenizer

    get_peft_model = staticmethod(get_peft_model)

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on; returns the model (the docs ignore the return)."""
        model.eval()
        _base(model).config.use_cache = True
        _engine(model).serves_generate = True  # model.generate runs on velotune's engine (inference/)
        return model

    @staticmethod
    def for_training(model):
        """Training mode with the KV cache off; returns the model. Gradient checkpointing is chosen once,
        by get_peft_model(use_gradient_checkpointing=...)."""
        model.train()
        _base(model).config.use_cache = False
        _engine(model).serves_generate = False
        release(model)  # the engine's KV cache and graphs give their memory back to training
        return model


def load_weights(folder: str | os.PathLike, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model in `folder` through from_pretrained's own path (same file choice, same classes),
    without tokenizer or quantization: what the export check loads to see what users will get."""
    source = resolve_source(folder)
    config = _load_config(source, False)
    cls = _model_class(config, False)
    if cls is None:
        return _load_generic(source, config, dtype, torch.device(device), None, False)
    return _load_own(cls, source, config, dtype, torch.device(device), None)


def _generation_engine(kwargs: dict) -> GenerationEngine:
    """The engine object for the model, from the inference arguments the docs pass for vLLM
    (fast_inference, gpu_memory_utilization, max_lora_rank, float8_kv_cache), taken out of `kwargs`."""
    names = ("fast_inference", "gpu_memory_utilization", "max_lora_rank", "float8_kv_cache")
    given = {name: kwargs.pop(name) for name in names if name in kwargs}
    return GenerationEngine(InferenceSettings(**given))


def _engine(model) -> GenerationEngine:
    """The model's engine object, attached now if the model was built elsewhere (not by from_pretrained)."""
    base = _base(model)
    if not isinstance(getattr(base, "generation_engine", None), GenerationEngine):
        base.generation_engine = GenerationEngine()
    return base.generation_engine


def _base(model):
    """The transformers-level model under any PEFT wrapping."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _quantization_mode(load_in_4bit: bool, load_in_8bit: bool, device: torch.device) -> str | None:
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both True; choose one (4-bit is QLoRA)")
    if not (load_in_4bit or load_in_8bit):
        return None
    ok, reason = nf4_available(device)
    if load_in_8bit:
        if device.type != "cuda":
            logger.warning("velotune: load_in_8bit needs a CUDA GPU (bitsandbytes int8 matmul); loading 16-bit "
                           "weights instead on %s", device)
            return None
        return "int8"
    if not ok:
        logger.warning("velotune: load_in_4bit=True but 4-bit NF4 cannot run here (%s); loading full-precision "
                       "weights instead. Training works the same, using more memory; pass load_in_4bit=False "
                       "to silence this.", reason)
        return None
    return "nf4"


def _load_config(source: Source, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                          trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise ValueError(
            f"cannot read the model configuration in {source.folder}: {str(error).splitlines()[0]}\n"
            f"velotune's own families are {', '.join(SUPPORTED_MODEL_TYPES)}; other causal LMs load when "
            "transformers knows their model_type (or with trust_remote_code=True)"
        ) from error


# Files one of which every saved tokenizer has (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def _load_tokenizer(source: Source, trust_remote_code: bool):
    folder = Path(source.folder)
    if source.gguf_file is None and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers would try to build one from nothing and ask for sentencepiece instead.
        base = ""
        with contextlib.suppress(OSError, ValueError):
            base = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
        hint = f" (its config names {base!r})" if base and Path(base) != folder else ""
        raise FileNotFoundError(
            f"{folder} holds a model but no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). Save the tokenizer "
            f"beside the weights with tokenizer.save_pretrained({str(folder)!r}), or copy the tokenizer files of the "
            f"model it was trained from{hint} into the folder")
    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)


def _apply_rope_scaling(config: PretrainedConfig, max_seq_length: int, rope_scaling: dict | None) -> None:
    """Honour rope_scaling, or explain what happens when max_seq_length exceeds trained positions."""
    trained = getattr(config, "max_position_embeddings", None)
    current = getattr(config, "rope_parameters", None) or {}
    if rope_scaling is not None:
        params = dict(rope_scaling)
        params["rope_type"] = params.pop("type", params.get("rope_type", "linear"))
        base = current
        params.setdefault("rope_theta", base.get("rope_theta", 10000.0))
        config.rope_parameters = params
        return
    if trained is None or max_seq_length <= trained:
        return
    rope_type = current.get("rope_type", "default")
    if rope_type == "default" and "rope_theta" in current:
        factor = math.ceil(max_seq_length / trained)
        config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": float(factor)}
        logger.warning(
            "velotune: max_seq_length=%d exceeds the %d positions this model was trained on; applying dynamic "
            "NTK RoPE scaling (factor %d): sequences up to %d tokens behave exactly as before, longer ones use "
            "stretched positions. Pass rope_scaling=... to choose another scheme.",
            max_seq_length, trained, factor, trained)
    else:
        logger.warning(
            "velotune: max_seq_length=%d exceeds the %d positions this model supports with its %r RoPE; tokens "
            "beyond %d get positions it never saw and quality will drop. Pass rope_scaling=... to extend it.",
            max_seq_length, trained, rope_type, trained)


def _model_class(config, trust_remote_code: bool):
    """Our class for the config, or None for the generic transformers path; error when neither fits."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return model_class_for(config)
    except ValueError as own_error:
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or trust_remote_code:
            logger.warning("velotune: %r is not one of velotune's own families (%s); loading it through "
                           "transformers' class (generic path: slower, LoRA/QLoRA and export still work)",
                           config.model_type, ", ".join(SUPPORTED_MODEL_TYPES))
            return None
        raise ValueError(f"{own_error}; transformers has no causal-LM class for it either") from None


def _load_own(cls, source: Source, config, dtype, device, quant):
    if source.gguf_file is not None:
        # transformers' GGUF reader dequantizes into its own class; we take its weights.
        reference = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=dtype)
        shards = [reference.state_dict()]
        del reference
    elif _is_prequantized(config):
        # A "bnb-4bit" folder: small enough to read whole; its 4-bit layers are built first.
        shards = [{k: v for shard in iter_shards(source.folder) for k, v in shard.items()}]
    else:
        _refuse_foreign_quantization(config)
        shards = iter_shards(source.folder)
    with torch.device("meta"):
        model = cls(config)
    if _is_prequantized(config):
        _take_prequantized(model, shards[0], dtype, device, keep_4bit=quant == "nf4")
    _load_shards(model, shards, dtype, source.folder)
    model.to(device)
    if quant == "nf4":
        quantize_model_(model, skip_modules=_skip_modules(config), compute_dtype=dtype)
    elif quant == "int8":
        _quantize_int8(model)
    model.eval()
    return model


def _load_shards(model, shards, dtype, where=None) -> None:
    """Assign checkpoint tensors into a meta-device model one shard at a time."""
    for shard in shards:
        shard = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in shard.items()}
        if dtype == torch.float16:  # the file's values were finite (iter_shards checked); float16 ends at 65504
            check_finite(shard, where, why="they exceed float16's range (65504) once loaded in float16: a damaged "
                         "file (flipped bytes), or weights that need dtype=torch.bfloat16 or torch.float32")
        result = model.load_state_dict(shard, strict=False, assign=True)
        if result.unexpected_keys:
            logger.warning("velotune: checkpoint tensors not used by the model: %s", result.unexpected_keys[:8])
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    # Non-persistent buffers (RoPE frequencies) were created on the meta device: rebuild them.
    for rope in model.model.rotary_emb.values():
        rope.reset_frequencies()


def _quantization_config(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    return qc if qc is None or isinstance(qc, dict) else qc.to_dict()


def _is_prequantized(config) -> bool:
    qc = _quantization_config(config)
    return bool(qc) and qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def _skip_modules(config) -> tuple[str, ...]:
    """lm_head, plus whatever a pre-quantized checkpoint kept in 16-bit (dynamic 4-bit)."""
    qc = _quantization_config(config) or {}
    return ("lm_head", *(qc.get("llm_int8_skip_modules") or ()))


def _take_prequantized(model, shard: dict, dtype, device, keep_4bit: bool) -> None:
    """Replace each Linear whose bnb-4bit tensors are in `shard`, removing those tensors from it.

    keep_4bit=False (4-bit cannot run here, or was not asked for) dequantizes into a plain Linear.
    """
    suffix = ".weight.quant_state.bitsandbytes__nf4"
    for key in [k for k in shard if k.endswith(suffix)]:
        prefix = key[: -len(suffix)]
        names = [k for k in shard if k == f"{prefix}.weight" or k.startswith(f"{prefix}.weight.")]
        tensors = {k: shard.pop(k) for k in names}
        bias = shard.pop(f"{prefix}.bias", None)
        module = load_prequantized(tensors, prefix, bias=bias, compute_dtype=dtype, device=device)
        if not keep_4bit:
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                                     device=device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(dequantize_nf4_state(module.weight.data, module.weight.quant_state).to(dtype))
                if bias is not None:
                    linear.bias.copy_(bias)
            module = linear
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def _refuse_foreign_quantization(config) -> None:
    qc = _quantization_config(config)
    if qc is None:
        return
    raise ValueError(
        f"this checkpoint is quantized with {qc.get('quant_method')!r}, which velotune does not load; use its "
        "16-bit original or a bitsandbytes 4-bit ('bnb-4bit') version"
    )


def _quantize_int8(model) -> None:
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{child_name}".lstrip(".") != "lm_head":
                int8 = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                           has_fp16_weights=False, threshold=6.0)
                int8.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    int8.bias = child.bias
                setattr(module, child_name, int8.to(child.weight.device))


def _load_generic(source: Source, config, dtype, device, quant, trust_remote_code):
    """Any other causal LM: transformers' own class (slower, still LoRA/QLoRA-capable)."""
    extra = {}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant == "nf4", load_in_8bit=quant == "int8", bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, config=config, gguf_file=source.gguf_file, dtype=dtype, device_map={"": device},
        trust_remote_code=trust_remote_code, **extra)
    check_finite(model.state_dict(), source.folder)  # transformers' loader does not look: name a NaN/inf weight
    if quant == "nf4":  # transformers built bitsandbytes' own Linear4bit: ours computes the same on every CPU
        from .quant.nf4_linear import adopt_linear4bit_layers_

        adopt_linear4bit_layers_(model)
    return model.eval()


def _grow_embeddings(model, vocab_size: int) -> None:
    """New token rows start at the mean embedding, which keeps the output distribution sane."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=True)


def _converted_fixture(source: Source) -> Source:
    """Convert the bundled GGUF once into a safetensors folder; later loads take seconds."""
    target = fixture_cache() / source.fixture.replace("/", "--")
    if not (target / "config.json").is_file():
        logger.warning("velotune: converting %s once into %s", source.folder / source.gguf_file, target)
        config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (config.tie_word_embeddings and k == "lm_head.weight")}
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "velotune_fixture.json").write_text(json.dumps({"gguf": str(source.folder / source.gguf_file)}))
        partial.replace(target)  # atomic: a crash mid-conversion never leaves a folder that looks complete
    return Source(target, None, fixture=source.fixture)
