"""Filling a meta-device model from checkpoint shards, placing and quantizing each decoder layer as
soon as its last tensor has arrived.

Why: assigning every shard first and quantizing after holds the whole 16-bit model in host memory and
then on the device. Llama-3.3-70B is 141 GB in bf16 and 40 GB in NF4: that order cannot load it on an
80 GB or even a 141 GB GPU, which is what QLoRA of 70B models on one GPU (the docs' promise) needs.
Here shards are read one at a time; after each, every decoder layer whose tensors are now all present
moves to the device and is quantized there, and its 16-bit tensors are dropped. Peak host memory: one
shard plus the layers a shard boundary left incomplete; peak device memory: the layers quantized so
far, one 16-bit layer, then the embeddings, final norm and lm_head (moved at the end, as before).

Bytes are identical to quantizing the whole model after loading: the quantizers are the same functions
(quant/linear.py, int8.py, fp8.py) called per layer through their `within` argument, with the whole
model's names and skip list, and each tensor's quantization depends on that tensor alone.

Sources that are read whole (a GGUF file, dequantized by transformers; a "bnb-4bit" folder, whose
4-bit layers are built before this runs) arrive as a single shard: the same code, no new memory bound.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_shards import check_finite, checkpoint_files, read_shard
from ..quant import quantize_model_
from ..quant.int8 import quantize_model_int8_

logger = logging.getLogger("velotune")

# (model, within) -> None: quantize the Linears of submodule `within` ("" = the whole model), in place.
Quantizer = Callable[[nn.Module, str], object]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# The shard bar appears only once loading has taken this long (seconds): a 70B folder is ~30 shards
# and minutes of reading and quantizing; a small model's load should print nothing.
BAR_DELAY_S = 2.0


def quantizer_for(quant: str | None, skip_modules: tuple[str, ...], dtype: torch.dtype) -> Quantizer | None:
    """The one quantizer for `quant` ("nf4", "int8", "fp8" or None), as a function of (model, within)."""
    if quant is None:
        return None
    if quant == "nf4":
        return lambda model, within: quantize_model_(model, skip_modules, compute_dtype=dtype, within=within)
    if quant == "int8":
        return lambda model, within: quantize_model_int8_(model, skip_modules, within=within)
    if quant == "fp8":
        from ..quant.fp8 import quantize_model_fp8_

        return lambda model, within: quantize_model_fp8_(model, skip_modules, compute_dtype=dtype, within=within)
    raise ValueError(f"quant must be 'nf4', 'int8', 'fp8' or None, got {quant!r}")


def folder_shards(folder: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """(file, tensors) for each checkpoint file of `folder`, read only when asked for, with a progress
    bar over the files. The generator keeps no reference to a shard it has handed out."""
    from tqdm.auto import tqdm

    files = checkpoint_files(Path(folder))
    bar = tqdm(files, desc=f"velotune: loading {Path(folder).name}", unit="shard", leave=False,
               delay=BAR_DELAY_S, disable=len(files) < 2)
    for file in bar:
        yield file, read_shard(file)
    bar.close()


def load_streaming(model: nn.Module, shards: Iterable[tuple[Path | str, dict[str, torch.Tensor]]],
                   dtype: torch.dtype, device: torch.device, quantize: Quantizer | None) -> None:
    """Assign `shards` ((where, tensors) pairs) into `model` (built on the meta device), each decoder
    layer moved to `device` and quantized as soon as it is complete; then the rest is placed likewise.

    Raises ValueError naming the weights a checkpoint lacks, a tensor that overflows float16, or a
    tensor of a layer that an earlier shard already completed (a checkpoint holding it twice)."""
    layers = model.model.layers
    pending = dict(enumerate(layers))  # decoder layers still waiting for tensors, by index
    known = (set(model.state_dict()), tuple(f".{group.fused}.weight" for group in model.spec.fused_groups))
    for where, shard in shards:
        _refuse_repeats(shard, where, known, finished=set(range(len(layers))) - set(pending))
        _assign(model, shard, dtype, where)
        del shard  # the layers hold the tensors they use (folder_shards keeps none; a whole-read source
        # stays in its caller's list, as before)
        for index in [i for i, layer in pending.items() if _complete(layer)]:
            pending.pop(index).to(device)
            if quantize is not None:
                quantize(model, f"model.layers.{index}")  # its 16-bit weights are freed one by one
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    # Non-persistent buffers (RoPE frequencies) were created on the meta device: rebuild them.
    for rope in model.model.rotary_emb.values():
        rope.reset_frequencies()
    model.to(device)  # embeddings, final norm, lm_head, RoPE buffers; the layers are there already
    if quantize is not None:
        quantize(model, "")  # any Linear outside the decoder layers that the skip list does not keep


def _refuse_repeats(shard: dict, where, known: tuple[set[str], tuple[str, ...]], finished: set[int]) -> None:
    """A weight of a layer that is already placed and quantized would replace its quantized weight by a
    16-bit one: refuse it. `known`: the model's own keys, and the fused names a checkpoint may use
    instead (Phi-3's qkv_proj). Other keys (an old checkpoint's rotary inv_freq) stay unused tensors."""
    names, fused = known
    for key in shard:
        match = _LAYER_KEY.match(key)
        if match and int(match.group(1)) in finished and (key in names or key.endswith(fused)):
            raise ValueError(f"{where}: tensor {key!r} belongs to decoder layer {match.group(1)}, which earlier "
                             "shards already completed: the checkpoint holds it twice (a stray extra "
                             "*.safetensors file in the folder?); remove the duplicate file")


def _assign(model: nn.Module, shard: dict[str, torch.Tensor], dtype: torch.dtype, where) -> None:
    shard = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in shard.items()}
    if dtype == torch.float16:  # the file's values were finite (read_shard checked); float16 ends at 65504
        check_finite(shard, where, why="they exceed float16's range (65504) once loaded in float16: a damaged "
                     "file (flipped bytes), or weights that need dtype=torch.bfloat16 or torch.float32")
    result = model.load_state_dict(shard, strict=False, assign=True)
    if result.unexpected_keys:
        logger.warning("velotune: checkpoint tensors not used by the model: %s", result.unexpected_keys[:8])


def _complete(layer: nn.Module) -> bool:
    return not any(t.is_meta for t in itertools.chain(layer.parameters(), layer.buffers()))
