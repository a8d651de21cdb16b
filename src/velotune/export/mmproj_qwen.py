"""The `mmproj` layout of Qwen2-VL (`qwen2vl_merger`) and Qwen2.5-VL (`qwen2.5vl_merger`), read off llama.cpp's
converter (conversion/qwenvl.py) and clip.cpp (models/qwen2vl.cpp):

* the fused `attn.qkv` is split into q, k, v; the temporal Conv3d patch embedding (kernel (2, p, p)) becomes
  two Conv2d kernels, `v.patch_embd.weight` for frame 0 and `v.patch_embd.weight.1` for frame 1 (a still image
  is both frames, clip.cpp adds the two); the merger's `ln_q` is `v.post_ln`, its MLP `mm.0` / `mm.2`.
  Qwen2.5-VL adds `clip.use_silu` (gated SiLU MLP) and `clip.vision.n_wa_pattern` (every n-th block attends
  globally, the others in windows).
* clip.cpp hard-codes what the checkpoint could vary: 2x2 spatial merging, two temporal frames, M-RoPE over
  quarter-head sections, and for Qwen2.5-VL a 112-pixel attention window. A model outside these is refused
  (before a file is written) instead of giving wrong image embeddings in llama.cpp.
"""

from __future__ import annotations

import gguf

from ..models.spec import ProjectorSpec
from .mmproj_parts import MmprojTensor, MmprojUnsupported, default_qtype, gguf_name, tensor_names, write_vision_keys
from .weights import plan_tensors

QWEN_WINDOW = 112  # pixels: clip.cpp's Qwen2.5-VL attention window (it reads no key for it)


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


def check_supported(config, spec: ProjectorSpec) -> None:
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


def write_keys(writer: gguf.GGUFWriter, config, spec: ProjectorSpec, image_processor) -> None:
    """The `clip.*` keys, in the converter's order."""
    v = config.vision_config
    # Qwen2.5-VL: the blocks' MLP width. Qwen2-VL: its config's hidden_size (the merger's output width), which is
    # what the converter writes there; clip.cpp reads the MLP's width off the tensors, so the file stays the
    # converter's byte for byte
    write_vision_keys(writer, config, image_processor, image_size=getattr(v, "image_size", None) or 560,
                      width=_width(v, spec), feed_forward=v.intermediate_size if spec.gated_silu else v.hidden_size,
                      blocks=v.depth, heads=v.num_heads, patch_size=v.patch_size)
    writer.add_clip_projector_type(spec.projector)
    if spec.gated_silu:
        writer.add_vision_use_silu(True)
    if spec.windows:
        writer.add_vision_n_wa_pattern(_window_pattern(v))
    writer.add_vision_attention_layernorm_eps(1e-6)  # both families' vision norms (transformers hard-codes it)


def plan(model, config, spec: ProjectorSpec, file_qtype, tokenizer=None) -> list[MmprojTensor]:
    """Every tensor of the file, in the model's order, without computing any (no token embedding here: the
    tokenizer is not needed)."""
    names = tensor_names(config.vision_config.depth)
    out: list[MmprojTensor] = []
    for p in plan_tensors(model):
        if not p.name.startswith(spec.prefixes):
            continue
        hf = p.name[len("model."):]  # "visual.blocks.0.attn.qkv.weight", the converter's names
        if hf.endswith("patch_embed.proj.weight"):
            shape = (p.shape[0], p.shape[1], *p.shape[3:])  # one frame: (C_out, C_in, p, p)
            for frame, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
                out.append(MmprojTensor(name, shape, default_qtype(name, 4, file_qtype), p, frame=frame))
            continue
        parts = [(hf, None)]
        if ".attn.qkv." in hf:
            third = p.shape[0] // 3
            parts = [(hf.replace(".qkv.", f".{q}."), (i * third, (i + 1) * third)) for i, q in enumerate("qkv")]
        for hub, rows in parts:
            name = gguf_name(names, hub, p.name)
            shape = (rows[1] - rows[0], *p.shape[1:]) if rows else p.shape
            out.append(MmprojTensor(name, shape, default_qtype(name, len(shape), file_qtype), p, rows=rows))
    return out
