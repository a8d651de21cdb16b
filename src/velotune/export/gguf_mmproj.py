"""The `mmproj` file: a vision-language model's vision tower and projector as llama.cpp's multimodal library
(mtmd / clip.cpp) reads them, beside the language model's GGUF.

llama.cpp runs a vision-language model as two files: the text model (an ordinary GGUF of its architecture) and
an `mmproj` GGUF of architecture `clip` whose keys (`clip.projector_type`, `clip.vision.*`) and tensors
(`v.patch_embd`, `v.blk.N.*`, `v.post_ln`, `mm.*`) describe the encoder; clip.cpp picks the encoder's graph by
the projector type. Each family's layout (which tensors, under which names and types, which keys, what
clip.cpp hard-codes and the checkpoint could vary) is a module of its own, picked by the family's record
(`ProjectorSpec.layout`): mmproj_qwen.py (Qwen2-VL, Qwen2.5-VL), mmproj_gemma3.py (Gemma 3). This module
writes the file and checks it against the model.

Types as the converter writes an F16 file: 2-D and larger weights in F16; biases, norms and anything 1-D in
F32 (each layout names its exceptions). An F32 file is all F32 but for what the converter forces.

Tensors come from `weights.plan_tensors` / `materialize`, so LoRA trained on the vision layers is merged.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from ..models.spec import PROJECTORS, ProjectorSpec
from ..models.spec import projector_of as projector_record
from . import mmproj_gemma3, mmproj_pixtral, mmproj_qwen, quants
from .gguf_check import check_metadata, compare_tensor, digest
from .gguf_layout import read_layout
from .mmproj_parts import MmprojTensor, MmprojUnsupported
from .weights import TensorPlan, base_model_of, materialize

Q = gguf.GGMLQuantizationType
MMPROJ_TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "f32": (Q.F32, gguf.LlamaFileType.ALL_F32)}
LAYOUTS = {"qwen_merger": mmproj_qwen, "siglip_pool": mmproj_gemma3, "pixtral_breaks": mmproj_pixtral}

__all__ = ["MMPROJ_TYPES", "MmprojTensor", "MmprojUnsupported", "PROJECTORS", "check_mmproj", "open_writer",
           "plan_mmproj", "projector_of", "write_mmproj"]


def projector_of(config) -> ProjectorSpec:
    """The family's record (velotune.models.spec.PROJECTORS), or MmprojUnsupported naming the supported ones."""
    spec = projector_record(config)
    if spec is None:
        raise MmprojUnsupported(f"no mmproj writer for model_type {config.model_type!r}; supported: "
                                f"{', '.join(PROJECTORS)}")
    return spec


def plan_mmproj(model, file_qtype: Q, tokenizer=None) -> list[MmprojTensor]:
    """Every tensor of the file, in the model's order, without computing any (`tokenizer`: for layouts that
    store a token's embedding, Pixtral's [IMG_BREAK])."""
    config = base_model_of(model).config
    spec = projector_of(config)
    return LAYOUTS[spec.layout].plan(model, config, spec, file_qtype, tokenizer)


def open_writer(model, image_processor, mmproj_type: str, model_name: str, tokenizer=None):
    """(a writer with every key and tensor announced, the tensors): all of the file but its tensor data."""
    base = base_model_of(model)
    spec = projector_of(base.config)
    layout = LAYOUTS[spec.layout]
    layout.check_supported(base.config, spec)
    if mmproj_type not in MMPROJ_TYPES:
        raise ValueError(f"mmproj_type={mmproj_type!r}: choose one of {', '.join(MMPROJ_TYPES)}")
    file_qtype, file_type = MMPROJ_TYPES[mmproj_type]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(model_name)
    writer.add_file_type(int(file_type))
    layout.write_keys(writer, base.config, spec, image_processor)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = plan_mmproj(model, file_qtype, tokenizer)
    for t in tensors:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), quants.quantized_nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)
    return writer, tensors


def _encode(t: MmprojTensor, value: torch.Tensor) -> np.ndarray:
    return quants.as_writable(quants.encode(t.take(value).reshape(-1, t.shape[-1]), t.qtype))


@torch.no_grad()
def write_mmproj(model, path: Path, image_processor, mmproj_type: str = "f16", model_name: str = "",
                 tokenizer=None) -> dict:
    """Write the file at `path` (through `path.partial`); returns each tensor's digest for `check_mmproj`."""
    writer, tensors = open_writer(model, image_processor, mmproj_type, model_name, tokenizer)
    partial = path.with_name(path.name + ".partial")
    digests: dict[str, bytes] = {}
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        cache: tuple[TensorPlan, torch.Tensor] | None = None
        for t in tensors:  # the parts of one plan are consecutive: each merged tensor is built once
            if cache is None or cache[0] is not t.plan:
                cache = (t.plan, materialize(model, t.plan).float())
            data = _encode(t, cache[1])
            writer.write_tensor_data(data)
            digests[t.gguf_name] = digest(data)
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        if partial.exists():
            partial.unlink()
    return digests


@torch.no_grad()
def check_mmproj(model, path: Path, image_processor, mmproj_type: str = "f16", model_name: str = "",
                 digests: dict | None = None, tokenizer=None) -> int:
    """The file holds what the model holds: every key the writer would write, every tensor byte for byte
    (hashed against `digests` from the export, else encoded again). Returns the tensor count; raises
    gguf_check.GGUFContentError naming the first differences."""
    from .gguf_check import GGUFContentError

    writer, tensors = open_writer(model, image_processor, mmproj_type, model_name, tokenizer)
    layout = read_layout(path)
    check_metadata(writer, layout, path)
    writer.close()
    in_file = {t.name: t for t in layout.tensors}
    problems = [f"{n} is in the file but not in the model" for n in in_file if n not in {t.gguf_name for t in tensors}]
    for t in tensors:
        found = in_file.get(t.gguf_name)
        shape = tuple(reversed(found.dims)) if found is not None else None
        if found is None or found.qtype != t.qtype or shape != t.shape:
            problems.append(f"{t.gguf_name}: {'missing' if found is None else f'{found.qtype.name} {shape}'} in the "
                            f"file, {t.qtype.name} {t.shape} expected")
            continue
        data = layout.data(found)
        if digests is not None and digests.get(t.gguf_name) == digest(data):
            continue
        _, _, problem = compare_tensor(t.gguf_name, t.qtype, t.take(materialize(model, t.plan).float()), data)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise GGUFContentError(f"{path} does not hold the model's vision tower: " + "; ".join(problems[:5]))
    return len(tensors)
