"""The `mmproj` file: a vision-language model's vision tower and projector as llama.cpp's multimodal library
(mtmd / clip.cpp) reads them, beside the language model's GGUF.

llama.cpp runs a vision-language model as two files: the text model (an ordinary GGUF of its architecture) and
an `mmproj` GGUF of architecture `clip` whose keys (`clip.projector_type`, `clip.vision.*`) and tensors
(`v.patch_embd`, `v.blk.N.*`, `v.post_ln`, `mm.N`) describe the encoder; clip.cpp picks the encoder's graph by
the projector type. The facts below are read off llama.cpp's converter (convert_hf_to_gguf.py --mmproj,
conversion/qwenvl.py) and clip.cpp's loader (tools/mtmd/clip.cpp, clip-impl.h, models/qwen2vl.cpp):

* Qwen2-VL (`qwen2vl_merger`) and Qwen2.5-VL (`qwen2.5vl_merger`): the fused `attn.qkv` is split into q, k, v;
  the temporal Conv3d patch embedding (kernel (2, p, p)) becomes two Conv2d kernels, `v.patch_embd.weight` for
  frame 0 and `v.patch_embd.weight.1` for frame 1 (a still image is both frames, clip.cpp adds the two);
  the merger's `ln_q` is `v.post_ln`, its MLP `mm.0` / `mm.2`. Qwen2.5-VL adds `clip.use_silu` (gated SiLU
  MLP) and `clip.vision.n_wa_pattern` (every n-th block attends globally, the others in windows).
* clip.cpp hard-codes what the checkpoint could vary: 2x2 spatial merging, two temporal frames, M-RoPE over
  quarter-head sections, and for Qwen2.5-VL a 112-pixel attention window. A model outside these is refused
  here (before a file is written) instead of giving wrong image embeddings in llama.cpp.
* Types as the converter writes an F16 file: 2-D and larger weights (and the patch kernels) in F16; biases,
  norms and anything 1-D in F32. An F32 file is all F32.

Tensors come from `weights.plan_tensors` / `materialize`, so LoRA trained on the vision layers is merged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..models.spec import PROJECTORS, ProjectorSpec
from ..models.spec import projector_of as projector_record
from . import quants
from .gguf_check import check_metadata, compare_tensor, digest
from .gguf_layout import read_layout
from .weights import TensorPlan, base_model_of, materialize, plan_tensors

Q = gguf.GGMLQuantizationType
MMPROJ_TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "f32": (Q.F32, gguf.LlamaFileType.ALL_F32)}
QWEN_WINDOW = 112  # pixels: clip.cpp's Qwen2.5-VL attention window (it reads no key for it)


class MmprojUnsupported(ValueError):
    """llama.cpp's clip.cpp cannot run this vision tower as the checkpoint configures it."""


def projector_of(config) -> ProjectorSpec:
    """The family's record (velotune.models.spec.PROJECTORS), or MmprojUnsupported naming the supported ones."""
    spec = projector_record(config)
    if spec is None:
        raise MmprojUnsupported(f"no mmproj writer for model_type {config.model_type!r}; supported: "
                                f"{', '.join(PROJECTORS)}")
    return spec


@dataclass(frozen=True)
class MmprojTensor:
    """One tensor of the file: made from `plan`'s merged tensor, the `rows` slice of it (q/k/v of a fused
    qkv) or one temporal `frame` of a Conv3d kernel, or all of it."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    plan: TensorPlan
    rows: tuple[int, int] | None = None
    frame: int | None = None

    def take(self, value: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            value = value[self.rows[0]:self.rows[1]]
        if self.frame is not None:
            value = value[:, :, self.frame]  # (C_out, C_in, kt, p, p) -> (C_out, C_in, p, p)
        return value.float().contiguous()


def _check_supported(config, spec: ProjectorSpec) -> None:
    """What clip.cpp fixes and the checkpoint could vary; each named with the value llama.cpp needs."""
    v = config.vision_config
    problems = []
    if getattr(v, "spatial_merge_size", 2) != 2:
        problems.append(f"spatial_merge_size={v.spatial_merge_size} (clip.cpp merges 2x2 patches)")
    if getattr(v, "temporal_patch_size", 2) != 2:
        problems.append(f"temporal_patch_size={v.temporal_patch_size} (clip.cpp splits the kernel into 2 frames)")
    head_dim = _width(v, spec) // v.num_heads
    if head_dim % 4:
        problems.append(f"a vision head of {head_dim} (clip.cpp's M-RoPE needs a multiple of 4)")
    act = getattr(v, "hidden_act", None)
    want = "silu" if spec.gated_silu else "quick_gelu"
    if act != want:
        problems.append(f"hidden_act={act!r} (clip.cpp's {spec.projector} uses {want})")
    if spec.windows:
        if getattr(v, "window_size", QWEN_WINDOW) != QWEN_WINDOW:
            problems.append(f"window_size={v.window_size} (clip.cpp's {spec.projector} uses {QWEN_WINDOW})")
        _window_pattern(v)
    if problems:
        raise MmprojUnsupported(f"llama.cpp cannot run this {config.model_type} vision tower: "
                                + "; ".join(problems))


def _width(v, spec: ProjectorSpec) -> int:
    """The vision blocks' width (the config field the family's record names)."""
    return getattr(v, spec.width)


def _window_pattern(v) -> int:
    full = list(getattr(v, "fullatt_block_indexes", None) or [])
    n = full[0] + 1 if full else 0
    if not full or any(b - a != n for a, b in zip(full, full[1:])):
        raise MmprojUnsupported(f"fullatt_block_indexes={full}: clip.cpp needs full attention every n-th block "
                                "(evenly spaced, starting at block n-1)")
    return n


def _image_stats(image_processor) -> tuple[list[float], list[float]]:
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None or len(mean) < 3 or len(std) < 3:
        raise ValueError("the mmproj file needs the image processor's image_mean and image_std: pass the processor "
                         "FastVisionModel.from_pretrained returned as the tokenizer argument")
    return [float(x) for x in mean[:3]], [float(x) for x in std[:3]]


def write_keys(writer: gguf.GGUFWriter, config, spec: ProjectorSpec, image_processor) -> None:
    """The `clip.*` keys, in the converter's order."""
    v = config.vision_config
    mean, std = _image_stats(image_processor)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config.get_text_config().hidden_size)
    writer.add_vision_image_size(getattr(v, "image_size", None) or 560)  # the converter's default for Qwen
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(_width(v, spec))
    # Qwen2.5-VL: the blocks' MLP width. Qwen2-VL: its config's hidden_size (the merger's output width), which is
    # what the converter writes there; clip.cpp reads the MLP's width off the tensors, so the file stays the
    # converter's byte for byte
    writer.add_vision_feed_forward_length(v.intermediate_size if spec.gated_silu else v.hidden_size)
    writer.add_vision_block_count(v.depth)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    writer.add_clip_projector_type(spec.projector)
    if spec.gated_silu:
        writer.add_vision_use_silu(True)
    if spec.windows:
        writer.add_vision_n_wa_pattern(_window_pattern(v))
    writer.add_vision_attention_layernorm_eps(1e-6)  # both families' vision norms (transformers hard-codes it)


def _qtype(gguf_name: str, ndim: int, file_qtype: Q) -> Q:
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or ".position_embd." in gguf_name:
        return Q.F32
    return file_qtype


def plan_mmproj(model, file_qtype: Q) -> list[MmprojTensor]:
    """Every tensor of the file, in the model's order, without computing any."""
    base = base_model_of(model)
    spec = projector_of(base.config)
    # the projector's `mm.N` names come from the same numbered table as the blocks: at least 3 entries for mm.2
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(base.config.vision_config.depth, 3))
    out: list[MmprojTensor] = []
    for plan in plan_tensors(model):
        if not plan.name.startswith(spec.prefix):
            continue
        hf = plan.name[len("model."):]  # "visual.blocks.0.attn.qkv.weight", the converter's names
        if hf.endswith("patch_embed.proj.weight"):
            shape = (plan.shape[0], plan.shape[1], *plan.shape[3:])  # one frame: (C_out, C_in, p, p)
            for frame, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
                out.append(MmprojTensor(name, shape, _qtype(name, 4, file_qtype), plan, frame=frame))
            continue
        parts = [(hf, None)]
        if ".attn.qkv." in hf:
            third = plan.shape[0] // 3
            parts = [(hf.replace(".qkv.", f".{p}."), (i * third, (i + 1) * third)) for i, p in enumerate("qkv")]
        for name, rows in parts:
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise MmprojUnsupported(f"no llama.cpp mmproj tensor for {plan.name!r}")
            shape = (rows[1] - rows[0], *plan.shape[1:]) if rows else plan.shape
            out.append(MmprojTensor(gguf_name, shape, _qtype(gguf_name, len(shape), file_qtype), plan, rows=rows))
    return out


def open_writer(model, image_processor, mmproj_type: str, model_name: str):
    """(a writer with every key and tensor announced, the tensors): all of the file but its tensor data."""
    base = base_model_of(model)
    spec = projector_of(base.config)
    _check_supported(base.config, spec)
    if mmproj_type not in MMPROJ_TYPES:
        raise ValueError(f"mmproj_type={mmproj_type!r}: choose one of {', '.join(MMPROJ_TYPES)}")
    file_qtype, file_type = MMPROJ_TYPES[mmproj_type]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(model_name)
    writer.add_file_type(int(file_type))
    write_keys(writer, base.config, spec, image_processor)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = plan_mmproj(model, file_qtype)
    for t in tensors:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), quants.quantized_nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)
    return writer, tensors


def _encode(t: MmprojTensor, value: torch.Tensor) -> np.ndarray:
    return quants.as_writable(quants.encode(t.take(value).reshape(-1, t.shape[-1]), t.qtype))


@torch.no_grad()
def write_mmproj(model, path: Path, image_processor, mmproj_type: str = "f16", model_name: str = "") -> dict:
    """Write the file at `path` (through `path.partial`); returns each tensor's digest for `check_mmproj`."""
    writer, tensors = open_writer(model, image_processor, mmproj_type, model_name)
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
                 digests: dict | None = None) -> int:
    """The file holds what the model holds: every key the writer would write, every tensor byte for byte
    (hashed against `digests` from the export, else encoded again). Returns the tensor count; raises
    gguf_check.GGUFContentError naming the first differences."""
    from .gguf_check import GGUFContentError

    writer, tensors = open_writer(model, image_processor, mmproj_type, model_name)
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
