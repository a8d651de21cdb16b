"""What llama.cpp needs to know about each family: GGUF architecture, hyperparameters, tensor
names, and the few layout changes between transformers' tensors and llama.cpp's.

Every per-family fact comes from the family's record (`velotune.models.spec.GGUFSpec`, read by
`family_of`): the architecture name, q/k row permutation for llama.cpp's pairwise rope, the norm
offset baked into Gemma's norms (llama.cpp scales by w, Gemma by 1 + w), a tied output, the
soft-capping and sliding-window keys. Phi-3's fused qkv and gate_up come fused from
`weights.plan_tensors`. Llama 3 rope scaling travels as a `rope_freqs` tensor; Phi-3 LongRoPE as
two factor tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import gguf
import torch

from velotune.models.spec import FAMILIES, FamilySpec, family_of, head_dim_of, layer_types_of

logger = logging.getLogger("velotune")


def gguf_family(config) -> FamilySpec:
    """The family record of a model llama.cpp can run; ValueError (before anything is written) otherwise."""
    spec = family_of(config)
    if spec is None or spec.gguf is None:
        supported = sorted(name for name, s in FAMILIES.items() if s.gguf is not None)
        raise ValueError(f"GGUF export supports the families {', '.join(supported)}; this model is "
                         f"{getattr(config, 'model_type', None)!r}. Save it with save_pretrained_merged and convert "
                         "it with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports it.")
    return spec


def check_attention_scale(config, spec: FamilySpec) -> None:
    """llama.cpp's Gemma 2/3 read no attention-scale key: they scale queries by head_dim ** -0.5, or by
    (hidden / heads) ** -0.5 when the layer count is the 27B's. A config whose query_pre_attn_scalar is neither
    would run in llama.cpp with other attention than the model's: ValueError before any file is written."""
    layers = spec.gguf.large_layers
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if not layers or scalar is None:
        return
    heads = config.num_attention_heads
    used = config.hidden_size // heads if config.num_hidden_layers == layers else head_dim_of(config)
    if float(scalar) != float(used):
        raise ValueError(f"GGUF export: query_pre_attn_scalar={scalar} but llama.cpp's {spec.gguf.arch} scales "
                         f"attention by {used} ** -0.5 (head_dim, or hidden_size / num_attention_heads in a "
                         f"{layers}-layer model) and reads no key for it, so the file would not behave like the "
                         "model. Every released checkpoint of the family matches that rule; save this model with "
                         "save_pretrained_merged instead.")


def gguf_arch(config) -> str:
    """The GGUF architecture name; ValueError (before anything is written) for other families."""
    return gguf_family(config).gguf.arch


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor llama.cpp needs that is not a model weight (rope factor tables)."""

    name: str
    value: torch.Tensor


def _rope(config) -> tuple[dict, dict]:
    """(full-attention rope parameters, sliding-attention ones or {})."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention", {}), params.get("sliding_attention", {})
    return params, {}


def write_hparams(writer: gguf.GGUFWriter, config) -> list[ExtraTensor]:
    """Add the architecture's key/values; return rope tables to write as tensors."""
    family = gguf_family(config).gguf
    n_head, head_dim = config.num_attention_heads, head_dim_of(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if family.vocab_size_key:
        writer.add_vocab_size(config.vocab_size)
    full, sliding = _rope(config)
    writer.add_rope_freq_base(full.get("rope_theta", 10000.0))
    rotary = int(head_dim * full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    writer.add_rope_dimension_count(rotary)
    if family.rope_sections:
        writer.add_rope_dimension_sections(_mrope_sections(config, full, rotary))
    extras = _rope_scaling(writer, config, full, rotary)
    if sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
    _attention_specials(writer, config, family)
    return extras


def _mrope_sections(config, params: dict, rotary: int) -> list[int]:
    """M-RoPE's (temporal, height, width) frequency counts padded to llama.cpp's four sections."""
    sections = [int(n) for n in params.get("mrope_section") or ()]
    if not sections or len(sections) > 4 or sum(sections) != rotary // 2:
        raise ValueError(f"GGUF export of {config.model_type!r}: rope_parameters['mrope_section'] is "
                         f"{params.get('mrope_section')!r}; llama.cpp needs up to 4 sections summing to "
                         f"{rotary // 2} (head_dim / 2)")
    return (sections + [0, 0, 0])[:4]


def _rope_scaling(writer, config, params: dict, rotary: int) -> list[ExtraTensor]:
    kind = params.get("rope_type", "default")
    factor = params.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if params.get(key) is not None:
                add(params[key])
    elif kind == "llama3":
        return [ExtraTensor("rope_freqs.weight", _llama3_factors(params, rotary))]
    elif kind == "longrope":
        return _longrope(writer, config, params)
    elif kind == "dynamic":
        logger.warning("velotune: llama.cpp has no dynamic NTK RoPE; the GGUF behaves like the model up to its "
                       "%d trained positions, not beyond", config.max_position_embeddings)
    elif kind != "default":
        raise ValueError(f"GGUF export: rope_type {kind!r} has no llama.cpp equivalent")
    return []


def _llama3_factors(params: dict, dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's scaling (llama.cpp multiplies wavelengths by them)."""
    base = params.get("rope_theta", 10000.0)
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(freqs), torch.where(wavelen > old / low, factor, mid))
    return out.float()


def _longrope(writer, config, params: dict) -> list[ExtraTensor]:
    original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    scale = config.max_position_embeddings / original
    attn = params.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_rope_scaling_attn_factors(attn)
    return [ExtraTensor("rope_factors_long.weight", torch.tensor(params["long_factor"], dtype=torch.float32)),
            ExtraTensor("rope_factors_short.weight", torch.tensor(params["short_factor"], dtype=torch.float32))]


def _attention_specials(writer, config, family) -> None:
    """Soft-capping and sliding-window keys, as the family's `GGUFSpec` says llama.cpp reads them."""
    window = getattr(config, "sliding_window", None)
    if family.softcapping == "both":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    elif family.softcapping == "final" and getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    shorter = bool(window) and window < config.max_position_embeddings
    if family.sliding_window == "always":
        writer.add_sliding_window(window or 0)
    elif family.sliding_window == "pattern" and window:
        writer.add_sliding_window(window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types_of(config)])
    elif family.sliding_window == "bounded":
        writer.add_sliding_window(window if shorter else 0)
    elif family.sliding_window == "ignored" and shorter and getattr(config, "use_sliding_window", True):
        logger.warning("velotune: llama.cpp runs %s without its %d-token sliding window; outputs match the "
                       "model only for contexts up to that length", config.model_type, window)


class TensorNamer:
    """transformers tensor name -> (GGUF name, layout fix) for one model."""

    def __init__(self, config):
        self.config = config
        self.spec = gguf_family(config)
        check_attention_scale(config, self.spec)
        self.arch_name = self.spec.gguf.arch
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch_name)
        self.map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for tensors llama.cpp does not read (a tied or Gemma lm_head)."""
        if hf_name == "lm_head.weight" and self.spec.gguf.tied_output:
            return None
        out = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor for {hf_name!r} in architecture {self.arch_name!r}")
        return out

    def _qk_heads(self, hf_name: str) -> int | None:
        """Heads of a q/k projection llama.cpp wants interleaved, None for every other tensor."""
        if not self.spec.gguf.permute_qk:
            return None
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.config.num_attention_heads
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.config.num_key_value_heads
        return None

    def convert(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """transformers layout -> llama.cpp layout (float32)."""
        value = value.float()
        if self.spec.norm_offset and hf_name.endswith("norm.weight"):
            return value + self.spec.norm_offset
        heads = self._qk_heads(hf_name)
        return value if heads is None else _interleave_heads(value, heads)

    def revert(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """llama.cpp layout -> transformers layout (the inverse of `convert`)."""
        if self.spec.norm_offset and hf_name.endswith("norm.weight"):
            return value - self.spec.norm_offset
        heads = self._qk_heads(hf_name)
        return value if heads is None else _halve_heads(value, heads)


def _halve_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `_interleave_heads`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _interleave_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] -> [x0, y0, x1, y1, ...]: transformers rotates
    the two halves of a head together, llama.cpp's `llama` rope rotates adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
