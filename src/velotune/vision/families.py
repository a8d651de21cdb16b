"""The vision-language families `FastVisionModel` loads, and which part of the model each linear
layer belongs to.

transformers (5.x) lays every family out the same way under `model.`: a vision encoder
(`visual`, `vision_model` or `vision_tower`), a projector into the text embedding space
(`multi_modal_projector`, or Qwen's `visual.merger`) and the text decoder (`language_model`),
with `lm_head` beside `model`. So one rule classifies a layer by its dotted name: the
component is read from the first part under `model.`, the kind (attention or MLP) from the
container it sits in. The records below name what differs per family (the vision encoder's
name, the projector's) and are checked against a built model by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

VISION = "vision"
LANGUAGE = "language"
ATTENTION = "attention"
MLP = "mlp"

# Containers of attention projections (self-attention, Mllama's cross-attention into the image,
# Qwen's fused `attn.qkv`, Pixtral's `attention`) and of feed-forward layers.
ATTENTION_PARTS = frozenset({"self_attn", "cross_attn", "attn", "attention"})
MLP_PARTS = frozenset({"mlp", "feed_forward"})


@dataclass(frozen=True)
class VisionFamily:
    """One vision-language family: its transformers `model_type`, the name of its vision encoder and of
    its projector under `model.`, and what the docs call it."""

    model_type: str
    vision_encoder: str
    projector: str
    description: str


FAMILIES = {f.model_type: f for f in (
    VisionFamily("qwen2_vl", "visual", "visual.merger", "Qwen2-VL"),
    VisionFamily("qwen2_5_vl", "visual", "visual.merger", "Qwen2.5-VL"),
    VisionFamily("mllama", "vision_model", "multi_modal_projector", "Llama 3.2 Vision"),
    VisionFamily("llava", "vision_tower", "multi_modal_projector", "Llava / Pixtral"),
    VisionFamily("gemma3", "vision_tower", "multi_modal_projector", "Gemma 3 (multimodal)"),
)}
GENERIC = VisionFamily("", "", "multi_modal_projector", "")
VISION_ENCODERS = ("visual", "vision_model", "vision_tower")


def family_of(model_type: str) -> VisionFamily:
    """The family record; other image-text-to-text models of transformers use the common layout rule."""
    return FAMILIES.get(model_type, GENERIC)


def supported_list() -> str:
    return ", ".join(f"{f.model_type} ({f.description})" for f in FAMILIES.values())


@dataclass(frozen=True)
class LayerGroup:
    """Where one linear layer sits: component (VISION or LANGUAGE, the projector counts as vision),
    kind (ATTENTION, MLP or None), and whether it is the projector."""

    component: str | None
    kind: str | None
    projector: bool = False


def group_of(name: str, family: VisionFamily) -> LayerGroup:
    """Classify a linear layer by its dotted module name (e.g. `model.visual.blocks.0.attn.qkv`)."""
    parts = name.split(".")
    inner = parts[1:] if parts[0] == "model" else parts
    inner_name = ".".join(inner)
    projector = bool(family.projector) and (inner_name == family.projector
                                            or inner_name.startswith(family.projector + "."))
    if projector:
        return LayerGroup(VISION, MLP, projector=True)  # the projector is a small MLP on the vision side
    if inner and inner[0] in VISION_ENCODERS:
        component = VISION
    elif inner and inner[0] in ("language_model", "text_model"):
        component = LANGUAGE
    else:
        return LayerGroup(None, None)  # lm_head and anything outside the two towers
    kind = next((ATTENTION if p in ATTENTION_PARTS else MLP for p in reversed(inner[:-1])
                 if p in ATTENTION_PARTS or p in MLP_PARTS), None)
    return LayerGroup(component, kind)


def kept_16bit(family: VisionFamily) -> tuple[str, ...]:
    """Module name patterns NF4 loading leaves in 16-bit (quant.linear's `_skipped` rule: whole dotted parts).

    Why: the vision encoder and projector are small (Qwen2.5-VL-7B: 0.68B of 8.3B parameters; Llama 3.2
    11B Vision: 0.9B of 10.6B) while every image token passes through all of them, so their rounding
    error reaches every image position of every layer of the text decoder; their activations also
    carry the large outliers (patch embeddings, un-normalised projector inputs) where 4-bit blockwise
    scales lose most. Dynamic 4-bit (DESIGN.md section 4) therefore keeps them 16-bit, with lm_head.
    """
    return ("lm_head", *VISION_ENCODERS, "multi_modal_projector")
