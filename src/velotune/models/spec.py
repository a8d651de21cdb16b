"""What distinguishes one decoder family from another, read off a Hugging Face config.

Every supported family is the same pre-norm decoder with a handful of switches. Keeping the
switches in one frozen record (instead of one model file per family) means a new family is a
few lines here, and the parity tests exercise one code path for all of them. The record is also
everything the exporters know about a family (llama.cpp's architecture, the checkpoint's fused
tensors): code outside `velotune.models` asks `family_of(config)` and never tests `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class FusedGroup:
    """One checkpoint tensor our model keeps as separate projections, so LoRA can target each
    (Phi-3's qkv_proj, gate_up_proj): the parts concatenated along dim 0, in `parts` order.
    Names are relative to a decoder layer."""

    fused: str                # "self_attn.qkv_proj"
    parts: tuple[str, ...]    # ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp takes the family (from its model loader and convert_hf_to_gguf.py)."""

    arch: str                      # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False       # llama.cpp's `llama` rope rotates adjacent pairs, transformers the
                                   # two halves of a head: q/k rows are interleaved per head on export
    tied_output: bool = False      # llama.cpp's Gemma reads the output from token_embd: no lm_head written
    vocab_size_key: bool = False   # `{arch}.vocab_size` is written (convert_hf_to_gguf does for llama)
    softcapping: str = ""          # "both": attention and final keys, 0 when off (Gemma 2);
                                   # "final": the final key when the config sets it (Gemma 3)
    sliding_window: str = ""       # "always": window or 0 (Gemma 2); "pattern": window and the per-layer
                                   # pattern (Gemma 3); "bounded": window if shorter than the context,
                                   # else 0 (Phi-3); "ignored": llama.cpp runs without it (warned)
    rope_sections: bool = False    # `rope.dimension_sections` from the M-RoPE `mrope_section` (Qwen2-VL's text model)
    large_layers: int = 0          # llama.cpp ignores query_pre_attn_scalar (Gemma 2/3): it scales by head_dim ** -0.5,
                                   # or (hidden / heads) ** -0.5 in a model of this many layers (the 27B); 0: no scalar


@dataclass(frozen=True)
class FamilySpec:
    """Architecture knobs of one family. Values that vary per checkpoint come from the config."""

    model_type: str
    norm_offset: float = 0.0          # RMSNorm scales by (offset + w): 1.0 for Gemma (zero-init w, fp32 scale)
    qk_norm: bool = False             # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False       # extra norms after attention and after the MLP (Gemma 2/3)
    scale_embeddings: bool = False    # embeddings multiplied by sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: bool = False  # attention scaled by config.query_pre_attn_scalar ** -0.5 (Gemma 2/3)
    qkv_bias: bool | None = None      # None: follow config.attention_bias
    fused_groups: tuple[FusedGroup, ...] = ()  # checkpoint tensors split on load, fused on save (Phi-3)
    gguf: GGUFSpec | None = None      # None: llama.cpp has no architecture for it


_PHI3_FUSED = (
    FusedGroup("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FusedGroup("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)

FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("llama", gguf=GGUFSpec("llama", permute_qk=True, vocab_size_key=True)),
        FamilySpec("mistral", gguf=GGUFSpec("llama", permute_qk=True, vocab_size_key=True, sliding_window="ignored")),
        FamilySpec("qwen2", qkv_bias=True, gguf=GGUFSpec("qwen2", sliding_window="ignored")),
        FamilySpec("qwen3", qk_norm=True, gguf=GGUFSpec("qwen3")),
        FamilySpec("gemma", norm_offset=1.0, scale_embeddings=True, gguf=GGUFSpec("gemma", tied_output=True)),
        FamilySpec("gemma2", norm_offset=1.0, sandwich_norm=True, scale_embeddings=True, query_pre_attn_scalar=True,
                   gguf=GGUFSpec("gemma2", tied_output=True, softcapping="both", sliding_window="always",
                                 large_layers=46)),
        FamilySpec("gemma3_text", norm_offset=1.0, qk_norm=True, sandwich_norm=True, scale_embeddings=True,
                   query_pre_attn_scalar=True,
                   gguf=GGUFSpec("gemma3", tied_output=True, softcapping="final", sliding_window="pattern",
                                 large_layers=62)),
        FamilySpec("phi3", fused_groups=_PHI3_FUSED, gguf=GGUFSpec("phi3", sliding_window="bounded")),
    )
}
# Gemma 3 multimodal checkpoints name their text part "gemma3"; text-only ones "gemma3_text".
_ALIASES = {"gemma3": "gemma3_text"}

# The language models inside vision-language checkpoints whose text config has a model_type of its own. They
# are not families FastLanguageModel loads (no checkpoint is one of them alone), but the GGUF export writes them
# on their own beside the `mmproj` projector file (vision/export.py): Qwen2-VL's and Qwen2.5-VL's text model is
# Qwen2's decoder, which llama.cpp runs as its `qwen2vl` architecture (M-RoPE sections in the metadata).
TEXT_PARTS: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("qwen2_vl_text", qkv_bias=True,
                   gguf=GGUFSpec("qwen2vl", sliding_window="ignored", rope_sections=True)),
        FamilySpec("qwen2_5_vl_text", qkv_bias=True,
                   gguf=GGUFSpec("qwen2vl", sliding_window="ignored", rope_sections=True)),
    )
}


def family_of(config: PretrainedConfig) -> FamilySpec | None:
    """The family record of a transformers config (our classes' or transformers' own, or the text part of a
    vision-language one), None if unknown."""
    model_type = getattr(config, "model_type", None)
    model_type = _ALIASES.get(model_type, model_type)
    return FAMILIES.get(model_type) or TEXT_PARTS.get(model_type)


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types_of(config: PretrainedConfig) -> list[str]:
    """'full_attention' or 'sliding_attention' per layer, as transformers decides it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[: config.num_hidden_layers]
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def activation_name(config: PretrainedConfig) -> str:
    # Gemma configs carry both; transformers' Gemma code reads hidden_activation.
    return getattr(config, "hidden_activation", None) or config.hidden_act


def attention_scaling(config: PretrainedConfig, spec: FamilySpec) -> float:
    if spec.query_pre_attn_scalar:
        return config.query_pre_attn_scalar ** -0.5
    return head_dim_of(config) ** -0.5


# Fused checkpoint tensors. One implementation for the model (split on load, fuse on save) and
# the exporters (which fuse while streaming, one tensor at a time).


def fused_group_of(spec: FamilySpec, name: str) -> tuple[str, tuple[str, ...]] | None:
    """For one of our weight names inside a fused group: (the checkpoint's fused name, every one of
    our names that make it, in order); None for any other name."""
    for group in spec.fused_groups:
        for part in group.parts:
            suffix = f"{part}.weight"
            if name == suffix or name.endswith("." + suffix):
                layer = name[: -len(suffix)]  # "model.layers.3."
                return f"{layer}{group.fused}.weight", tuple(f"{layer}{p}.weight" for p in group.parts)
    return None


def fuse_state_dict(spec: FamilySpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our split weights -> the checkpoint's fused ones (in place; returns `state`)."""
    for name in list(state):
        found = fused_group_of(spec, name)
        if found is not None and all(p in state for p in found[1]):
            state[found[0]] = torch.cat([state.pop(p) for p in found[1]], dim=0)
    return state


def _rows(config: PretrainedConfig, part: str) -> int:
    """Output rows of one projection of a decoder layer (its share of a fused tensor)."""
    leaf = part.rpartition(".")[2]
    if leaf == "q_proj":
        return config.num_attention_heads * head_dim_of(config)
    if leaf in ("k_proj", "v_proj"):
        return (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim_of(config)
    if leaf in ("gate_proj", "up_proj"):
        return config.intermediate_size
    raise ValueError(f"no row count known for the fused part {part!r}: add it to velotune.models.spec._rows")


def split_state_dict(spec: FamilySpec, config: PretrainedConfig, state: dict, prefix: str = "") -> None:
    """The checkpoint's fused weights under `prefix` -> our split ones (in place)."""
    for key in [k for k in state if k.startswith(prefix)]:
        for group in spec.fused_groups:
            suffix = f"{group.fused}.weight"
            if key == prefix + suffix or key.endswith("." + suffix):
                layer = key[: -len(suffix)]
                sizes = [_rows(config, p) for p in group.parts]
                if sum(sizes) != state[key].shape[0]:
                    raise ValueError(f"{key} has {state[key].shape[0]} rows; the config's {', '.join(group.parts)} "
                                     f"need {sizes} (sum {sum(sizes)}): the checkpoint does not match its config.json")
                for part, value in zip(group.parts, state.pop(key).split(sizes, dim=0)):
                    state[f"{layer}{part}.weight"] = value


@dataclass(frozen=True)
class ProjectorSpec:
    """One vision-language family as llama.cpp's clip.cpp takes it: what export/gguf_mmproj.py writes into the
    `mmproj` file (facts read off llama.cpp's converter and clip.cpp; see the layout modules it names)."""

    model_type: str    # the vision-language config's model_type
    projector: str     # `clip.projector_type` (a gguf.VisionProjectorType value)
    layout: str        # the writer: "qwen_merger" (export/mmproj_qwen.py), "siglip_pool" (export/mmproj_gemma3.py),
                       # "pixtral_breaks" (export/mmproj_pixtral.py)
    prefixes: tuple[str, ...]  # the vision side's module prefixes in our model (tower, projector)
    gated_silu: bool = False   # `clip.use_silu`: the blocks' MLP is gate/up/down with SiLU (else quick GELU fc1/fc2)
    windows: bool = False      # `clip.vision.n_wa_pattern` from `fullatt_block_indexes`
    width: str = "hidden_size"  # the vision config's field with the blocks' width (Qwen2-VL's hidden_size is the
                                # merger's)
    fixed_size: bool = False   # clip.cpp resizes every image to the tower's square image_size (Gemma 3); else it
                               # takes any size in whole merged patches (Qwen, Pixtral)
    vision_type: str = ""      # only towers of this vision config model_type (Llava: Pixtral's, not CLIP's)
    row_break: str = ""        # a token whose embedding clip.cpp puts after each row of patches but the last
                               # (Pixtral's [IMG_BREAK]): part of the image embeddings llama.cpp hands over


PROJECTORS = {p.model_type: p for p in (
    ProjectorSpec("qwen2_vl", "qwen2vl_merger", "qwen_merger", ("model.visual.",), width="embed_dim"),
    ProjectorSpec("qwen2_5_vl", "qwen2.5vl_merger", "qwen_merger", ("model.visual.",), gated_silu=True,
                  windows=True),
    ProjectorSpec("gemma3", "gemma3", "siglip_pool", ("model.vision_tower.", "model.multi_modal_projector."),
                  fixed_size=True),
    # Llava with a CLIP tower is left out: the vendored llama.cpp's llava graph puts the CLS embedding last
    ProjectorSpec("llava", "pixtral", "pixtral_breaks", ("model.vision_tower.", "model.multi_modal_projector."),
                  vision_type="pixtral", row_break="[IMG_BREAK]"),
)}


def projector_of(config: PretrainedConfig) -> ProjectorSpec | None:
    """The vision-language family's mmproj record, or None (llama.cpp's file is not written for it)."""
    spec = PROJECTORS.get(getattr(config, "model_type", None))
    if spec is not None and spec.vision_type:
        vision = getattr(config, "vision_config", None)
        if getattr(vision, "model_type", None) != spec.vision_type:
            return None
    return spec
