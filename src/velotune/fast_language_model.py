"""`FastLanguageModel`: the Unsloth API's entry points (from_pretrained, get_peft_model,
for_inference, for_training) over velotune's own model classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from . import settings
from .device import resolve_device, resolve_dtype
from .inference import GenerationEngine, InferenceSettings, release
from .kernels import set_fast_launch
from .lora.peft_model import get_peft_model, load_adapter_model
from .models.from_folder import load_config, load_generic, load_own, model_class
from .quant import nf4_available
from .resolve import Source, resolve_source, travel_name
from .tokenizer import apply_gguf_special_tokens, fix_tokenizer as fix_pad_token

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
        load_in_fp8: bool = False,
        fp8_compute: bool = False,
        **kwargs,
    ):
        """Load (model, tokenizer). See README for the sources and the precision rules.

        `load_in_fp8=True`: the projection weights are stored as FP8 e4m3 with row-wise scales
        (quantized at load from a 16-bit checkpoint; lm_head and embeddings stay 16-bit) and their
        GEMMs run in FP8. `fp8_compute=True` with 4-bit (or 16-bit) storage: the same FP8 GEMMs,
        the weights converted just in time. Both need a GPU with FP8 (compute capability 8.9+);
        elsewhere a notice and the 16-bit path (`VELOTUNE_REQUIRE_FP8=1`: an error instead)."""
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
        load_in_fp8, fp8_compute, load_in_4bit = _fp8_mode(load_in_fp8, fp8_compute, load_in_4bit, load_in_8bit,
                                                           full_finetuning, device)
        quant = "fp8" if load_in_fp8 else _quantization_mode(load_in_4bit, load_in_8bit, device)
        if source.fixture is not None:
            source = _converted_fixture(source)

        config = load_config(source, trust_remote_code)
        _apply_rope_scaling(config, max_seq_length, rope_scaling)
        cls = model_class(config, trust_remote_code)
        tokenizer = _load_tokenizer(source, trust_remote_code)
        if cls is None:
            model = load_generic(source, config, dtype, device, quant, trust_remote_code)
        else:
            model = load_own(cls, source, config, dtype, device, quant)
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
        if fp8_compute:
            _enable_fp8_compute(model)
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
        raise ValueError("load_in_4bit and load_in_8bit are both True (load_in_4bit defaults to True); choose one: for "
                         "8-bit pass load_in_4bit=False, load_in_8bit=True (4-bit is QLoRA)")
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


def _fp8_mode(load_in_fp8: bool, fp8_compute: bool, load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool,
              device: torch.device) -> tuple[bool, bool, bool]:
    """(FP8 storage, FP8 compute, load_in_4bit) as they will apply on `device` (fast/fp8_matmul.py)."""
    from .quant.fp8 import fp8_unavailable

    if not (load_in_fp8 or fp8_compute):
        return False, False, load_in_4bit
    asked = "load_in_fp8" if load_in_fp8 else "fp8_compute"
    if load_in_8bit:
        raise ValueError(f"{asked}=True and load_in_8bit=True: choose one (FP8 storage/compute, or bitsandbytes "
                         "int8 storage)")
    if full_finetuning:
        logger.warning("velotune: full_finetuning=True trains every weight in 16-bit; %s is ignored", asked)
        return False, False, load_in_4bit
    why = fp8_unavailable(device)
    if why is not None:
        if settings.current().require_fp8:
            raise RuntimeError(f"{asked}=True with VELOTUNE_REQUIRE_FP8=1, but {why}")
        logger.warning("velotune: %s=True but %s; loading %s weights with 16-bit GEMMs instead", asked, why,
                       "16-bit" if load_in_fp8 else ("4-bit" if load_in_4bit else "16-bit"))
        return False, False, False if load_in_fp8 else load_in_4bit
    if load_in_fp8 and load_in_4bit:
        logger.info("velotune: load_in_fp8=True stores the weights in FP8, not 4-bit (pass load_in_4bit=True with "
                    "fp8_compute=True for 4-bit storage with FP8 compute)")
    return load_in_fp8, True, False if load_in_fp8 else load_in_4bit


def _enable_fp8_compute(model) -> None:
    """Turn on the FP8 GEMMs in the step plan of our decoder (the generic transformers path has none)."""
    from .fast.plan import find_decoder, set_fp8_compute

    if find_decoder(model) is None:
        logger.warning("velotune: FP8 compute runs in velotune's own decoders; %s loads through transformers, "
                       "so its GEMMs stay 16-bit", type(model).__name__)
        return
    set_fp8_compute(model, True)


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
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                              trust_remote_code=trust_remote_code)
    if source.gguf_file is not None:
        apply_gguf_special_tokens(tokenizer, folder / source.gguf_file)
    return tokenizer


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
        tokenizer = _load_tokenizer(source, trust_remote_code=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (config.tie_word_embeddings and k == "lm_head.weight")}
        # One folder per process (two processes converting at once, test workers or scripts, each write their
        # own), renamed into place at the end: a crash mid-conversion never leaves a folder that looks complete.
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "velotune_fixture.json").write_text(json.dumps({"gguf": str(source.folder / source.gguf_file)}))
        try:
            partial.replace(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another process finished first: the same conversion
    return Source(target, None, fixture=source.fixture)
