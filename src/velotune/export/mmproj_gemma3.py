"""The `mmproj` layout of Gemma 3 (projector type `gemma3`), read off llama.cpp's converter (conversion/gemma.py,
Gemma3VisionModel) and clip.cpp (models/siglip.cpp, the `gemma3` branch):

* the tower is SigLIP: patch embedding with bias, learned position embeddings, pre-norm blocks with LayerNorm
  (weight and bias), GELU (tanh) MLP, `post_layernorm` -> `v.post_ln`; the hub names are
  `vision_tower.vision_model.*` (transformers 5 keeps the module as `model.vision_tower.*`).
* the projector is transformers' Gemma3MultiModalProjector: the patch grid average-pooled by a kernel of
  (patches per side) / sqrt(mm_tokens_per_image), an RMSNorm with the (1 + w) scale (`mm.soft_emb_norm`, stored
  as 1 + w as the converter does), then `x @ mm_input_projection_weight` (`mm.input_projection`, stored as the
  checkpoint holds it, (vision width, text width); clip.cpp transposes it).
* clip.cpp pools by 4 unless `clip.vision.projector.scale_factor` says otherwise (the converter writes the key
  only when the kernel is not 4: every released Gemma 3 is 896 px / 14 px patches -> 64 per side, 256 tokens).
* types: the converter forces `mm.input_projection` to F16 (in an F32 file too) and everything under the
  embeddings (patch kernel, its bias, position table) to F32.
* clip.cpp resizes every image to image_size x image_size (no pan-and-scan crops) and runs GELU with tanh: a
  tower with another activation is refused.

In llama.cpp the image tokens attend to each other both ways (mtmd decodes Gemma 3's image batch non-causally),
as transformers' Gemma 3 does with the processor's token_type_ids.
"""

from __future__ import annotations

import math

import gguf

from ..models.spec import ProjectorSpec
from .mmproj_parts import MmprojTensor, MmprojUnsupported, default_qtype, gguf_name, tensor_names, write_vision_keys
from .weights import plan_tensors

Q = gguf.GGMLQuantizationType
CLIP_DEFAULT_POOL = 4  # clip.cpp's n_merge for `gemma3` when the file has no scale-factor key
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # both the tanh approximation ggml_gelu computes


def _pool(config) -> tuple[int, int]:
    """(patches per side, pooling kernel) as transformers' Gemma3MultiModalProjector computes them."""
    v = config.vision_config
    per_side = v.image_size // v.patch_size
    tokens_side = math.isqrt(int(config.mm_tokens_per_image))
    return per_side, per_side // max(tokens_side, 1)


def check_supported(config, spec: ProjectorSpec) -> None:
    v = config.vision_config
    problems = []
    act = getattr(v, "hidden_act", None)
    if act not in GELU_TANH:
        problems.append(f"vision hidden_act={act!r} (clip.cpp's {spec.projector} tower uses GELU with tanh, "
                        "gelu_pytorch_tanh)")
    tokens = int(config.mm_tokens_per_image)
    per_side, kernel = _pool(config)
    if math.isqrt(tokens) ** 2 != tokens or kernel * math.isqrt(tokens) != per_side or v.image_size % v.patch_size:
        problems.append(f"mm_tokens_per_image={tokens} with image_size={v.image_size}, patch_size={v.patch_size} "
                        "(clip.cpp pools a square patch grid by a whole kernel into a square of tokens)")
    if problems:
        raise MmprojUnsupported(f"llama.cpp cannot run this {config.model_type} vision tower: "
                                + "; ".join(problems))


def write_keys(writer: gguf.GGUFWriter, config, spec: ProjectorSpec, image_processor) -> None:
    """The `clip.*` keys, in the converter's order."""
    v = config.vision_config
    write_vision_keys(writer, config, image_processor, image_size=v.image_size, width=v.hidden_size,
                      feed_forward=v.intermediate_size, blocks=v.num_hidden_layers, heads=v.num_attention_heads,
                      patch_size=v.patch_size)
    writer.add_clip_projector_type(spec.projector)
    writer.add_vision_attention_layernorm_eps(getattr(v, "layer_norm_eps", 1e-6))
    writer.add_vision_use_gelu(True)
    kernel = _pool(config)[1]
    if kernel != CLIP_DEFAULT_POOL:
        writer.add_vision_projector_scale_factor(kernel)


def _hub_name(name: str) -> str | None:
    """Our parameter name -> the checkpoint name llama.cpp's converter maps, None for tensors it skips."""
    rest = name[len("model."):]
    if rest.startswith("vision_tower."):
        tower = rest[len("vision_tower."):]
        if tower.startswith("head."):  # SigLIP's pooling head: Gemma 3 reads the last hidden state, not it
            return None
        return "vision_tower.vision_model." + tower
    return rest.replace("_weight", ".weight")  # multi_modal_projector.mm_input_projection_weight: a bare Parameter


def _qtype(hub: str, name: str, ndim: int, file_qtype: Q) -> Q:
    if "input_projection" in hub and ndim > 1:
        return Q.F16
    if ".embeddings." in hub:
        return Q.F32
    return default_qtype(name, ndim, file_qtype)


def plan(model, config, spec: ProjectorSpec, file_qtype, tokenizer=None) -> list[MmprojTensor]:
    """Every tensor of the file, in the model's order, without computing any (no token embedding here: the
    tokenizer is not needed)."""
    names = tensor_names(config.vision_config.num_hidden_layers)
    out: list[MmprojTensor] = []
    for p in plan_tensors(model):
        if not p.name.startswith(spec.prefixes):
            continue
        hub = _hub_name(p.name)
        if hub is None:
            continue
        name = gguf_name(names, hub, p.name)
        shift = 1.0 if name == "mm.soft_emb_norm.weight" else 0.0  # Gemma's (1 + w) norm, stored as 1 + w
        out.append(MmprojTensor(name, p.shape, _qtype(hub, name, len(p.shape), file_qtype), p, shift=shift))
    return out
