"""Building a model from a checkpoint folder: our own class for the families velotune implements,
transformers' class for any other causal LM (the generic path), 4-bit or 8-bit on request.

`from_pretrained` (fast_language_model.py) adds what a user-facing load needs on top (finding
the files, the tokenizer, RoPE scaling, the fixture); the export check (export/verify.py) loads
a merged folder through `load_weights` to see exactly what users will get. Both sit above this
module, which is why it lives here and not in fast_language_model.py.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..checkpoint_shards import check_finite, iter_shards
from ..quant import dequantize_nf4_state, load_prequantized
from ..resolve import Source, resolve_source
from . import SUPPORTED_MODEL_TYPES, model_class_for
from .stream_load import folder_shards, load_streaming, quantizer_for

logger = logging.getLogger("velotune")


def load_config(source: Source, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                          trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise ValueError(
            f"cannot read the model configuration in {source.folder}: {str(error).splitlines()[0]}\n"
            f"velotune's own families are {', '.join(SUPPORTED_MODEL_TYPES)}; other causal LMs load when "
            "transformers knows their model_type (or with trust_remote_code=True)"
        ) from error


def model_class(config, trust_remote_code: bool):
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


def load_own(cls, source: Source, config, dtype, device, quant):
    """Our class filled from `source`, on `device`, quantized when `quant` is "nf4", "int8" or "fp8".

    A folder of 16-bit shards streams (stream_load.py): one shard read at a time, each decoder layer
    placed and quantized as soon as it is complete, so a 70B model loads in 4-bit without its 16-bit
    weights ever being whole in host memory or on the GPU. A GGUF source (transformers dequantizes it
    into its own class) and a "bnb-4bit" folder (4-bit already, so small; its 4-bit layers are built
    first) are read whole, as before, then placed by the same code as one shard."""
    if source.gguf_file is not None:
        # transformers' GGUF reader dequantizes into its own class; we take its weights.
        reference = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=dtype)
        shards = [(source.folder / source.gguf_file, reference.state_dict())]
        del reference
    elif _is_prequantized(config):
        # A "bnb-4bit" folder: small enough to read whole; its 4-bit layers are built first.
        shards = [(source.folder, {k: v for shard in iter_shards(source.folder) for k, v in shard.items()})]
    else:
        _refuse_foreign_quantization(config)
        shards = folder_shards(source.folder)
    with torch.device("meta"):
        model = cls(config)
    if _is_prequantized(config):
        _take_prequantized(model, shards[0][1], dtype, device, keep_4bit=quant == "nf4")
    load_streaming(model, shards, dtype, device, quantizer_for(quant, _skip_modules(config), dtype))
    model.eval()
    return model


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


def load_generic(source: Source, config, dtype, device, quant, trust_remote_code):
    """Any other causal LM: transformers' own class (slower, still LoRA/QLoRA-capable)."""
    extra = {}
    if quant is not None and quant != "fp8":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant == "nf4", load_in_8bit=quant == "int8", bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, config=config, gguf_file=source.gguf_file, dtype=dtype, device_map={"": device},
        trust_remote_code=trust_remote_code, **extra)
    check_finite(model.state_dict(), source.folder)  # transformers' loader does not look: name a NaN/inf weight
    if quant == "fp8":
        from ..quant.fp8 import quantize_model_fp8_

        quantize_model_fp8_(model, skip_modules=_skip_modules(config), compute_dtype=dtype)
    if quant == "nf4":  # transformers built bitsandbytes' own Linear4bit: ours computes the same on every CPU
        from ..quant.nf4_linear import adopt_linear4bit_layers_

        adopt_linear4bit_layers_(model)
    return model.eval()


def load_weights(folder: str | os.PathLike, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model in `folder` through from_pretrained's own path (same file choice, same classes),
    without tokenizer or quantization: what the export check loads to see what users will get."""
    source = resolve_source(folder)
    config = load_config(source, False)
    cls = model_class(config, False)
    if cls is None:
        return load_generic(source, config, dtype, torch.device(device), None, False)
    return load_own(cls, source, config, dtype, torch.device(device), None)
