"""What distinguishes one decoder family from another, read off a Hugging Face config.

Every supported family is the same pre-norm decoder with a handful of switches. Keeping the
switches in one frozen record (instead of one model file per family) means a new family is a
few lines here, and the parity tests exercise one code path for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class FamilySpec:
    """Architecture knobs of one family. Values that vary per checkpoint come from the config."""

    model_type: str
    gemma_norm: bool = False          # RMSNorm scales by (1 + w), computed in fp32, zero-init w
    qk_norm: bool = False             # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False       # extra norms after attention and after the MLP (Gemma 2/3)
    scale_embeddings: bool = False    # embeddings multiplied by sqrt(hidden_size) (Gemma)
    qkv_bias: bool | None = None      # None: follow config.attention_bias
    fused_checkpoint: bool = False    # Phi-3 stores qkv_proj and gate_up_proj fused


FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("llama"),
        FamilySpec("mistral"),
        FamilySpec("qwen2", qkv_bias=True),
        FamilySpec("qwen3", qk_norm=True),
        FamilySpec("gemma", gemma_norm=True, scale_embeddings=True),
        FamilySpec("gemma2", gemma_norm=True, sandwich_norm=True, scale_embeddings=True),
        FamilySpec("gemma3_text", gemma_norm=True, qk_norm=True, sandwich_norm=True, scale_embeddings=True),
        FamilySpec("phi3", fused_checkpoint=True),
    )
}


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
    if spec.sandwich_norm or spec.model_type == "gemma3_text":
        return config.query_pre_attn_scalar ** -0.5
    return head_dim_of(config) ** -0.5
