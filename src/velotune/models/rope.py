"""Rotary position embeddings for every rope variant a Hugging Face config can name.

The inverse frequencies of the scaled variants (linear, dynamic NTK, YaRN, LongRoPE, Llama 3)
are computed by transformers' published `ROPE_INIT_FUNCTIONS` (pure functions of the config),
so our positions are exactly the ones the checkpoint was trained with. The rotation itself is
ours: `velotune.kernels.rope.rope_reference`, also the RoPE kernel's plain path. Dynamic and
LongRoPE pick their frequencies from the longest position in the batch, as transformers does.

Multimodal RoPE (Qwen2-VL / Qwen2.5-VL, `mrope_section` in the rope parameters) gives each token
three position ids (temporal, height, width; text tokens have three equal ones): the rotary
frequencies are cut into three consecutive sections and each section turns by its own position id.
Only the cos/sin tables change, so the rotation, the kernels and the decode path stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .spec import head_dim_of


def rope_parameters_for(config: PretrainedConfig, layer_type: str) -> tuple[dict, str | None]:
    """The rope dict for one layer type, and the layer_type key transformers wants (or None)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type], layer_type
    return params, None


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; no parameters, so state dicts are unaffected."""

    def __init__(self, config: PretrainedConfig, layer_type: str = "full_attention"):
        super().__init__()
        self.config = config
        self.params, self.layer_type_key = rope_parameters_for(config, layer_type)
        self.rope_type = self.params.get("rope_type", "default")
        self.mrope_section: tuple[int, ...] | None = (
            tuple(int(n) for n in self.params["mrope_section"]) if self.params.get("mrope_section") else None)
        inv_freq, self.attention_scaling = self._frequencies(seq_len=None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._long_inv_freq: torch.Tensor | None = None

    def reset_frequencies(self) -> None:
        inv_freq, self.attention_scaling = self._frequencies(seq_len=None)
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = inv_freq.to(device)
        self._long_inv_freq = None

    def _frequencies(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            partial = self.params.get("partial_rotary_factor", getattr(self.config, "partial_rotary_factor", 1.0))
            dim = int(head_dim_of(self.config) * partial)
            base = self.params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            return inv_freq, 1.0
        kwargs = {"layer_type": self.layer_type_key} if self.layer_type_key else {}
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None, **kwargs)

    def _inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.rope_type not in ("dynamic", "longrope"):
            return self.inv_freq
        seq_len = int(position_ids.max()) + 1
        original = self.params.get("original_max_position_embeddings", self.config.max_position_embeddings)
        if self.rope_type == "longrope":
            if seq_len <= original:
                return self.inv_freq
            if self._long_inv_freq is None:
                self._long_inv_freq, _ = self._frequencies(seq_len=original + 1)
            return self._long_inv_freq.to(self.inv_freq.device)
        if seq_len <= self.config.max_position_embeddings:
            return self.inv_freq
        inv_freq, _ = self._frequencies(seq_len=seq_len)
        return inv_freq.to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T), or (3, B, T) temporal/height/width ids for multimodal RoPE (a (B, T)
        tensor there means text only: the three ids are equal). Returns cos, sin of (B, T, D_rot)."""
        inv_freq = self._inv_freq_for(position_ids).float()
        if self.mrope_section is not None:
            if position_ids.dim() == 2:
                position_ids = position_ids[None].expand(3, -1, -1)  # (3, B, T)
            freqs = mrope_frequencies(position_ids[..., None].float() * inv_freq, self.mrope_section)  # (B, T, D_rot/2)
        elif position_ids.dim() != 2:
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: this model's rope takes (batch, "
                             "sequence) ids; (3, batch, sequence) ids are for multimodal RoPE (mrope_section)")
        else:
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, D_rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D_rot)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)



def mrope_frequencies(freqs: torch.Tensor, sections: tuple[int, ...]) -> torch.Tensor:
    """(3, B, T, D_rot/2) angles, one set per position axis -> (B, T, D_rot/2): consecutive frequency
    sections of the given sizes take their angles from axis 0, 1, 2, 0, ... in turn (Qwen2-VL's layout;
    the sections sum to D_rot/2)."""
    if sum(sections) != freqs.shape[-1]:
        raise ValueError(f"mrope_section {list(sections)} sums to {sum(sections)} but the rotary embedding has "
                         f"{freqs.shape[-1]} frequencies (head_dim / 2); fix rope_parameters['mrope_section']")
    chunks = freqs.split(list(sections), dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
