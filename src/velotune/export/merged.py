"""`save_pretrained_merged`: LoRA merged into the base weights, written as a transformers folder.

The merge streams: tensors are built one at a time (`weights.materialize`), gathered into one
shard, written, and dropped, so the extra memory is about one shard, never a second model.
The shard budget is the smaller of `max_shard_size` and `maximum_memory_usage` x the memory
available now. A model trained in 4-bit is merged in its compute precision (NF4 dequantized),
since rounding the merged weights back to 4 bits would throw away much of what LoRA learned.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..models.saving import safetensors_only
from .folders import ExportRecord, atomic_path, check_free_space, human_size, parse_size, prepare_folder
from .weights import TensorPlan, base_model_of, is_tied, materialize, model_dtype, plan_tensors

logger = logging.getLogger("velotune")

SAVE_METHODS = {
    "merged_16bit": "LoRA merged into the base weights, in the model's own precision (16-bit for 16-bit models)",
    "merged_4bit": "refused: merging into 4-bit loses accuracy; use merged_4bit_forced if you really want it",
    "merged_4bit_forced": "LoRA merged, then quantized to NF4 in bitsandbytes' format (transformers loads it)",
    "lora": "only the LoRA adapter (PEFT folder) and the tokenizer",
}

REFUSE_4BIT = (
    "save_method='merged_4bit' would merge LoRA into the weights and round them back to 4 bits, which undoes "
    "much of the fine-tune and cannot be reversed. For GGUF, vLLM or further training save 'merged_16bit' (or "
    "'lora'); if a 4-bit bitsandbytes folder is really what you need (e.g. hosted 4-bit inference), pass "
    "save_method='merged_4bit_forced'."
)


def _check_method(save_method: str) -> str:
    method = str(save_method).strip().lower()
    if method not in SAVE_METHODS:
        listing = "\n".join(f"  {m}: {d}" for m, d in SAVE_METHODS.items())
        raise ValueError(f"save_method={save_method!r} is not one of:\n{listing}")
    if method == "merged_4bit":
        raise ValueError(REFUSE_4BIT)
    return method


def _shard_budget(max_shard_size, maximum_memory_usage: float) -> int:
    if not isinstance(maximum_memory_usage, (int, float)) or not 0 < maximum_memory_usage <= 1:
        raise ValueError(f"maximum_memory_usage={maximum_memory_usage!r}: a fraction in (0, 1], e.g. 0.75 "
                         "(lower it, say to 0.5, if saving runs out of memory)")
    by_memory = int(psutil.virtual_memory().available * maximum_memory_usage)
    return max(1, min(parse_size(max_shard_size), by_memory))


def _group_shards(plans: list[TensorPlan], itemsize: int, budget: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        nbytes = plan.numel * itemsize
        if shards[-1] and size + nbytes > budget:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += nbytes
    return shards


def _quantize_4bit(name: str, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """bitsandbytes-format NF4 tensors of one Linear weight (keys `<module>.weight...`)."""
    from velotune.quant import linear4bit_state_dict, to_linear4bit

    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    module = to_linear4bit(linear, dtype)
    return {k: v.cpu() for k, v in linear4bit_state_dict(module, name[: -len(".weight")]).items()}


def quantizable_4bit(plan: TensorPlan) -> bool:
    """Whether merged_4bit_forced writes this tensor in NF4: a decoder layer's 2-D weight (dynamic 4-bit's candidates)."""
    return len(plan.shape) == 2 and plan.name.endswith(".weight") and ".layers." in plan.name \
        and "embed" not in plan.name


def _export_config(base, dtype: torch.dtype, quant_4bit: bool, tied: bool, keep_16bit: tuple[str, ...] = ()):
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    if getattr(config, "tie_word_embeddings", False) and not tied:
        config.tie_word_embeddings = False  # lm_head was trained apart from the embeddings
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    if quant_4bit:
        from transformers import BitsAndBytesConfig

        config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head", *keep_16bit]).to_dict()
    return config


def save_pretrained_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    maximum_memory_usage: float = 0.75,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool | None = True,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    keep_16bit: tuple[str, ...] | list[str] = (),
    **kwargs,
) -> Path:
    """Write a merged (or adapter-only) folder; see SAVE_METHODS. Works on a LoRA model and on a
    fully fine-tuned plain model alike. Always safetensors (`safe_serialization=False` gets a notice:
    see models/saving.py). Returns the folder. `keep_16bit` (merged_4bit_forced): checkpoint module
    names written in 16-bit and listed in `llm_int8_skip_modules` (dynamic 4-bit, `velotune.quantize`)."""
    if kwargs:
        logger.warning("velotune: save_pretrained_merged ignores arguments it does not use: %s", sorted(kwargs))
    method = _check_method(save_method)
    folder = prepare_folder(save_directory, overwrite)
    record = ExportRecord(folder, method)
    if method == "lora":
        return _save_lora(model, folder, tokenizer, record)
    base = base_model_of(model)
    dtype = dtype or model_dtype(model)
    quant_4bit = method == "merged_4bit_forced"
    keep_16bit = tuple(keep_16bit)
    if keep_16bit and not quant_4bit:
        raise ValueError(f"keep_16bit lists modules to leave out of 4-bit; it needs save_method='merged_4bit_forced', "
                         f"not {method!r}")
    plans = plan_tensors(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(p.numel for p in plans) * itemsize
    check_free_space(folder, total // (3 if quant_4bit else 1), "the merged model")
    shards = _group_shards(plans, itemsize, _shard_budget(max_shard_size, maximum_memory_usage))
    safetensors_only(safe_serialization, "the merged model")
    stem, ext = "model", "safetensors"
    names = [f"{stem}.{ext}"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    index_name = f"{stem}.{ext}.index.json"
    record.begin(names + ([index_name] if len(names) > 1 else []) + ["config.json", "generation_config.json"])
    weight_map: dict[str, str] = {}
    written_bytes = 0
    bar = tqdm(total=len(plans), desc=f"velotune: merging into {folder}", unit="tensor", leave=False)
    for shard_plans, file_name in zip(shards, names):
        tensors: dict[str, torch.Tensor] = {}
        for plan in shard_plans:
            value = materialize(model, plan, dtype)
            if quant_4bit and quantizable_4bit(plan) and plan.name.removesuffix(".weight") not in keep_16bit:
                tensors.update(_quantize_4bit(plan.name, value, dtype))
            else:
                tensors[plan.name] = value.to("cpu").contiguous()
            bar.update(1)
        with atomic_path(folder / file_name) as partial:
            save_file(tensors, str(partial), metadata={"format": "pt"})
        written_bytes += (folder / file_name).stat().st_size
        weight_map.update({k: file_name for k in tensors})
        del tensors
    bar.close()
    files = list(names)
    if len(names) > 1:
        index = {"metadata": {"total_size": written_bytes}, "weight_map": weight_map}
        with atomic_path(folder / index_name) as partial:
            partial.write_text(json.dumps(index, indent=2) + "\n")
        files.append(index_name)
    files += _write_config_and_tokenizer(base, folder, tokenizer, _export_config(base, dtype, quant_4bit, is_tied(base), keep_16bit))
    record.finish(files, dtype=str(dtype).removeprefix("torch."))
    logger.info("velotune: saved %s model to %s (%d shard(s), %s)", method, folder, len(names),
                human_size(written_bytes))
    if verify:
        from .verify import check_merged

        check_merged(model, folder, tokenizer, quantized=quant_4bit)
    return folder


def _write_config_and_tokenizer(base, folder: Path, tokenizer, config) -> list[str]:
    config.save_pretrained(folder)
    files = ["config.json"]
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
        files.append("generation_config.json")
    if tokenizer is not None:
        files += [Path(f).name for f in tokenizer.save_pretrained(folder)]
    return files


def _save_lora(model, folder: Path, tokenizer, record: ExportRecord) -> Path:
    if not hasattr(model, "peft_config"):
        raise ValueError("save_method='lora' needs a model with LoRA adapters (from get_peft_model); this model "
                         "has none. Use save_method='merged_16bit' to save all of its weights.")
    record.begin(["adapter_config.json", "adapter_model.safetensors"])
    model.save_pretrained(folder)
    files = [p.name for p in folder.iterdir() if p.name.startswith("adapter_")]
    if tokenizer is not None:
        files += [Path(f).name for f in tokenizer.save_pretrained(folder)]
    record.finish(files)
    logger.info("velotune: saved the LoRA adapter to %s", folder)
    return folder
