"""The `mmproj` layout of Llava with a Pixtral tower (Pixtral-12B; projector type `pixtral`), read off llama.cpp's
converter (conversion/llava.py, LlavaVisionModel) and clip.cpp (models/pixtral.cpp):

* the tower: `patch_conv` (no bias) -> `v.patch_embd`, `ln_pre` (RMSNorm) -> `v.pre_ln`, blocks with RMSNorms
  (`attention_norm` -> ln1, `ffn_norm` -> ln2), a gated MLP (gate/up/down), no position table: 2-D RoPE over
  (row, column) with theta 10000 (clip.cpp fixes it; the converter writes no key). clip.cpp's 2-D rope rotates
  adjacent pairs, transformers rotates the two halves of each head, so q and k rows are interleaved per head
  (the converter's LlamaModel.permute, our gguf_arch._interleave_heads).
* the projector: Llava's `linear_1` / GELU / `linear_2` -> `mm.1` / `mm.2` (clip.cpp always runs GELU there).
* `[IMG_BREAK]`: clip.cpp appends its embedding (`v.token_embd.img_break`, the language model's embedding row of
  that token, taken from the tokenizer's id as the converter does) after every row of patches but the last, as
  Pixtral's processor lays out the image tokens; mtmd writes `[IMG_END]` after the image itself.
* keys: `clip.use_silu` or `clip.use_gelu` from the tower's hidden_act, the RMSNorm eps (transformers' Pixtral
  hard-codes 1e-5).
* refused: other activations, a rope theta other than 10000, features taken from another layer than the last or
  with Llava's "default" strategy (which drops the first token: Pixtral's are all patches), and Llava's other
  towers (CLIP: the vendored llava graph puts the CLS embedding last, transformers first). Mistral-Small-3.1's
  patch merger (`Mistral3ForConditionalGeneration`) is a family velotune does not load.
"""

from __future__ import annotations

import gguf

from ..models.spec import ProjectorSpec
from .mmproj_parts import MmprojTensor, MmprojUnsupported, default_qtype, gguf_name, tensor_names, write_vision_keys
from .weights import plan_tensors

CLIP_ROPE_THETA = 10000.0  # clip.cpp's pixtral rope theta (it reads no key for it)
PIXTRAL_NORM_EPS = 1e-5  # transformers' PixtralVisionModel RMSNorms (hard-coded there)
ACTIVATIONS = {"silu": "use_silu", "gelu": "use_gelu"}
BREAK_TOKEN = "[IMG_BREAK]"
BREAK_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]


def check_supported(config, spec: ProjectorSpec) -> None:
    v = config.vision_config
    problems = []
    if v.hidden_act not in ACTIVATIONS:
        problems.append(f"vision hidden_act={v.hidden_act!r} (clip.cpp's {spec.projector} runs "
                        f"{' or '.join(ACTIVATIONS)})")
    theta = (getattr(v, "rope_parameters", None) or {}).get("rope_theta", getattr(v, "rope_theta", CLIP_ROPE_THETA))
    if float(theta) != CLIP_ROPE_THETA:
        problems.append(f"vision rope_theta={theta} (clip.cpp's {spec.projector} uses {CLIP_ROPE_THETA:g})")
    layer = config.vision_feature_layer
    if layer not in (-1, v.num_hidden_layers - 1):
        problems.append(f"vision_feature_layer={layer} (clip.cpp's {spec.projector} takes the last layer's output)")
    if config.vision_feature_select_strategy != "full":
        problems.append(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} (clip.cpp keeps "
                        "every patch: 'full')")
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
    writer.add_vision_attention_layernorm_eps(PIXTRAL_NORM_EPS)
    getattr(writer, f"add_vision_{ACTIVATIONS[v.hidden_act]}")(True)


def _break_id(tokenizer) -> int:
    token_id = None if tokenizer is None else tokenizer.convert_tokens_to_ids(BREAK_TOKEN)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"the Pixtral mmproj file holds the {BREAK_TOKEN} token's embedding: pass the processor "
                         f"whose tokenizer has {BREAK_TOKEN} (FastVisionModel.from_pretrained returned it)")
    return int(token_id)


def plan(model, config, spec: ProjectorSpec, file_qtype, tokenizer=None) -> list[MmprojTensor]:
    """Every tensor of the file, in the converter's order (tower and projector, then [IMG_BREAK])."""
    names = tensor_names(config.vision_config.num_hidden_layers)
    heads = config.vision_config.num_attention_heads
    out: list[MmprojTensor] = []
    embed = None
    for p in plan_tensors(model):
        if p.name.endswith("language_model.embed_tokens.weight"):
            embed = p
        if not p.name.startswith(spec.prefixes):
            continue
        name = gguf_name(names, p.name[len("model."):], p.name)
        rope = p.name.endswith(("attention.q_proj.weight", "attention.k_proj.weight"))
        out.append(MmprojTensor(name, p.shape, default_qtype(name, len(p.shape), file_qtype), p,
                                interleave=heads if rope else 0))
    if embed is None:
        raise MmprojUnsupported("no language-model embedding found for the [IMG_BREAK] row")
    token = _break_id(tokenizer)
    out.append(MmprojTensor(BREAK_TENSOR, (embed.shape[1],), gguf.GGMLQuantizationType.F32, embed,
                            rows=(token, token + 1)))
    return out
