"""Mllama's text cross-attention without expanding the image's keys and values to every query head.

transformers' SDPA path (`sdpa_attention_forward`) repeats each of the 8 key/value heads for its 4 query heads
(`repeat_kv`) whenever a mask is given, and a cross-attention layer always has one: two (B, 32, N, 128) copies of the
image's keys and values per call, made again in the checkpoint's recomputation and kept for the backward. In the
snapshot of a Llama-3.2-11B-Vision QLoRA step (BENCHMARKS.md, session 18) those were 2 x 100 MiB at the step's peak.

Here each key/value head's query heads run as one longer query sequence instead (the G heads' T rows one after
another: (B, Hkv, G * T, D) against (B, Hkv, N, D) keys), so keys and values stay as projected; the mask, the same
for every head, is repeated per query head instead ((B, 1, G * T, N), a quarter of what the repeated keys and values
took at 4 tiles an image). The same products and softmax rows as transformers' call; only the kernels' summation
order can differ.

Set per instance (`install_cross_attention`) on the cross layers' `cross_attn` modules, which keep their class,
projections (PEFT wraps them; tower_lora.py fuses them) and state dict. Calls with a KV cache (generation), without
image states or a mask, with attention dropout in training, or with attention other than SDPA run the class's
forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _own_path(self, cross_attention_states, attention_mask, kwargs) -> bool:
    return (cross_attention_states is not None and attention_mask is not None
            and kwargs.get("cache") is None and kwargs.get("past_key_values") is None
            and not kwargs.get("output_attentions") and self.config._attn_implementation == "sdpa"
            and not (self.training and self.dropout))


def cross_attention_forward(self, hidden_states: torch.Tensor, cross_attention_states: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, **kwargs):
    """Set on a MllamaTextCrossAttention: hidden (B, T, C), image states (B, N, C) or (B * tiles, P, C), additive
    mask (B, 1, T, N) -> ((B, T, C), None), as the class's forward returns."""
    if not _own_path(self, cross_attention_states, attention_mask, kwargs):
        return type(self).forward(self, hidden_states, cross_attention_states=cross_attention_states,
                                  attention_mask=attention_mask, **kwargs)
    B, T, _ = hidden_states.shape
    heads, kv_heads, D = self.num_heads, self.num_key_value_heads, self.head_dim
    groups = heads // kv_heads
    q = self.q_norm(self.q_proj(hidden_states).view(B, T, heads, D).transpose(1, 2))  # (B, H, T, D)
    k = self.k_norm(self.k_proj(cross_attention_states).view(B, -1, kv_heads, D).transpose(1, 2))  # (B, Hkv, N, D)
    v = self.v_proj(cross_attention_states).view(B, -1, kv_heads, D).transpose(1, 2)  # (B, Hkv, N, D)
    N = k.shape[2]
    q = q.reshape(B, kv_heads, groups * T, D)  # query head h = kv * G + j: its kv head's j-th block of T rows
    mask = attention_mask.to(q.dtype).expand(B, 1, T, N).unsqueeze(2).expand(B, 1, groups, T, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(B, 1, groups * T, N), scale=self.scaling)
    # reshape, not view: CUDA's SDPA kernels may return (B, Hkv, G * T, D) with the heads innermost in memory
    out = out.reshape(B, heads, T, D).transpose(1, 2).reshape(B, T, heads * D)  # (B, T, H * D)
    return self.o_proj(out), None


def install_cross_attention(layers) -> int:
    """Set `cross_attention_forward` on the `cross_attn` of each of `layers` that has one (Mllama's cross-attention
    decoder layers); returns how many."""
    count = 0
    for layer in layers:
        attention = getattr(layer, "cross_attn", None)
        if isinstance(attention, nn.Module):
            attention.forward = types.MethodType(cross_attention_forward, attention)
            count += 1
    return count
