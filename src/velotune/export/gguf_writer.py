"""`save_pretrained_gguf`: merged weights straight into one or more GGUF files, in one pass.

No 16-bit folder on disk and no llama.cpp build: the writer announces every tensor's name, type
and size in each file's header first (sizes follow from shapes), then builds each merged tensor
once (`weights.materialize`), converts it to llama.cpp's layout, quantizes it for each requested
method, and appends it to every file. Peak extra memory is one tensor and its quantized copies.
Files are written as `*.partial` and renamed only when complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from . import quants
from .folders import ExportRecord, check_free_space, human_size, prepare_folder, write_failure
from .gguf_arch import ExtraTensor, TensorNamer, gguf_arch, write_hparams
from .gguf_check import digest
from .gguf_vocab import write_tokenizer
from .ollama import write_modelfile
from velotune.quant.gguf import FILE_TYPE

from .weights import TensorPlan, base_model_of, materialize, model_dtype, plan_tensors

logger = logging.getLogger("velotune")

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the output files: where it comes from and its GGUF name and shape."""

    gguf_name: str
    shape: tuple[int, ...]
    plan: TensorPlan | None = None
    extra: ExtraTensor | None = None


def _methods(quantization_method, dtype: torch.dtype) -> list[str]:
    given = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not given:
        raise ValueError("quantization_method is empty; pass a method such as 'q8_0' or a list of them")
    return list(dict.fromkeys(quants.normalize_method(m, dtype) for m in given))


@dataclass(frozen=True)
class _Mixture:
    """What llama.cpp's per-tensor type rules need to know about the model."""

    n_layers: int
    n_gqa: int
    tied: bool

    def qtype(self, method: str, tensor: GGUFTensor):
        if len(tensor.shape) < 2 or tensor.extra is not None:
            return Q.F32
        return quants.tensor_qtype(method, tensor.gguf_name, self.n_layers, tensor.shape, n_gqa=self.n_gqa,
                                   tied_embeddings=self.tied)


def _tensors(model, namer: TensorNamer, extras: list[ExtraTensor]) -> list[GGUFTensor]:
    out = []
    for plan in plan_tensors(model):
        name = namer.name(plan.name)
        if name is not None:
            out.append(GGUFTensor(name, plan.shape, plan=plan))
    out += [GGUFTensor(e.name, tuple(e.value.shape), extra=e) for e in extras]
    return out


def _open_writer(config, tokenizer, method: str, model_name: str, end_of_turn):
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_name)
    writer.add_file_type(int(FILE_TYPE[method]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extras = write_hparams(writer, config)
    write_tokenizer(writer, tokenizer, config.vocab_size, end_of_turn)
    return writer, extras


def _end_of_turn(tokenizer) -> str | None:
    from .ollama import ollama_template

    try:
        stops = ollama_template(tokenizer).stop_tokens
    except ValueError:
        return None
    return stops[0] if stops else None


def model_name_of(config, folder: Path) -> str:
    """`general.name`: the name the model was loaded by (loading records the hub id there)."""
    return str(getattr(config, "_name_or_path", "") or folder.name)


def plan_gguf(model, tokenizer, methods: list[str], model_name: str):
    """(writers with every key/value and tensor info announced, the tensors, the type rules): all
    of a file but its tensor data. The check rebuilds this to know what a file must hold."""
    config = base_model_of(model).config
    namer = TensorNamer(config)
    end_of_turn = _end_of_turn(tokenizer)
    writers, tensors, mixture = [], None, None
    for method in methods:
        writer, extras = _open_writer(config, tokenizer, method, model_name, end_of_turn)
        if tensors is None:
            tensors = _tensors(model, namer, extras)
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            tied = not any(t.gguf_name == "output.weight" for t in tensors)
            mixture = _Mixture(config.num_hidden_layers, config.num_attention_heads // kv, tied)
        for t in tensors:
            qtype = mixture.qtype(method, t)
            writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), quants.quantized_nbytes(t.shape, qtype),
                                   raw_dtype=qtype)
        writers.append(writer)
    return writers, tensors, mixture


def save_pretrained_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    quantization_method: str | list[str] = "fast_quantized",
    overwrite: bool = False,
    verify: bool = True,
    maximum_memory_usage: float = 0.75,
    **kwargs,
) -> list[Path]:
    """Write `<save_directory>/model-<METHOD>.gguf` for each method, a Modelfile beside each, and
    check every file against the in-memory model. Returns the GGUF paths.

    `maximum_memory_usage` is accepted for the Unsloth API's signature; the writer never holds more than
    one tensor (and its quantized copies), so there is nothing for it to bound."""
    if kwargs:
        logger.warning("velotune: save_pretrained_gguf ignores arguments it does not use: %s", sorted(kwargs))
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer (the GGUF file carries the vocabulary)")
    methods = _methods(quantization_method, model_dtype(model))
    config = base_model_of(model).config
    namer = TensorNamer(config)  # unsupported families fail here, before any file exists
    folder = prepare_folder(save_directory, overwrite)
    paths = [folder / f"model-{m.upper()}.gguf" for m in methods]
    writers, tensors, mixture = plan_gguf(model, tokenizer, methods, model_name=model_name_of(config, folder))
    needed = sum(quants.quantized_nbytes(t.shape, mixture.qtype(m, t)) for m in methods for t in tensors)
    check_free_space(folder, needed, "the GGUF file(s)")

    record = ExportRecord(folder, "gguf")
    modelfiles = ["Modelfile" if m == methods[0] else f"Modelfile.{m}" for m in methods]
    record.begin([p.name for p in paths] + modelfiles)
    partials = [p.with_name(p.name + ".partial") for p in paths]
    digests: list[dict] = [{} for _ in methods]
    try:
        for writer, partial in zip(writers, partials):
            writer.write_header_to_file(path=partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        _write_tensors(model, namer, tensors, methods, writers, mixture, folder, digests)
        for writer, partial, path in zip(writers, partials, paths):
            writer.close()
            os.replace(partial, path)
        writers = []
    except BaseException as error:
        named = next((n for n in (write_failure(path, partial, error) for partial, path in zip(partials, paths))
                      if n is not None), None)
        for partial in partials:
            if partial.exists():
                partial.unlink()
        record.abort()
        if named is not None:
            raise named from error
        raise
    finally:
        for writer in writers:
            writer.close()
        for partial in partials:
            if partial.exists():
                partial.unlink()

    files = [p.name for p in paths]
    for name, path in zip(modelfiles, paths):
        write_modelfile(folder / name, path, tokenizer, strict=False)
        files.append(name)
    record.finish(files, methods=methods)
    for path in paths:
        logger.info("velotune: wrote %s (%s)", path, human_size(path.stat().st_size))
    if verify:
        from .verify import check_gguf

        for method, path, written in zip(methods, paths, digests):
            check_gguf(model, path, tokenizer, method, digests=written)
    return paths


@torch.no_grad()
def _write_tensors(model, namer, tensors, methods, writers, mixture, folder, digests: list[dict]) -> None:
    """Each tensor built once, quantized once per type, appended to every file; `digests` gets, per
    file, the digest of each tensor's bytes (the check compares the file with them)."""
    bar = tqdm(tensors, desc=f"velotune: writing GGUF to {folder}", unit="tensor", leave=False)
    for t in bar:
        if t.extra is not None:
            value = t.extra.value.float()
        else:
            value = namer.convert(t.plan.name, materialize(model, t.plan))  # float32, llama.cpp layout
        done: dict = {}
        for method, writer, written in zip(methods, writers, digests):
            qtype = mixture.qtype(method, t)
            if qtype not in done:  # same type in several files: quantize once
                data = quants.as_writable(quants.encode(value.reshape(-1, value.shape[-1]), qtype))
                done[qtype] = (data, digest(data))
            writer.write_tensor_data(done[qtype][0])
            written[t.gguf_name] = done[qtype][1]


__all__ = ["GGUFTensor", "save_pretrained_gguf"]
