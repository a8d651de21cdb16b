"""Building blocks of the decoder: norms, gated MLP, attention.

Module and parameter names are transformers' (q_proj, gate_proj, input_layernorm, ...), so a
state dict or a PEFT adapter moves between our model and theirs without renaming. The numerics
follow theirs step for step (where the upcasts happen matters in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from ..fast import lora_linear, lora_mlp
from ..fast.plan import PLAIN, StepPlan
from ..kernels import apply_rope, rms_norm
from ..kernels.rms_norm import rms_norm_reference
from ..kernels.rope import rope_reference
from .masks import LayerMasks
from .spec import FamilySpec, activation_name, attention_scaling, head_dim_of


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in fp32, cast back, then scale by w."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, plan: StepPlan = PLAIN) -> torch.Tensor:
        if plan.fast:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return rms_norm_reference(x, self.weight, self.variance_epsilon, cast_before_scale=True)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the scale is (1 + w), applied in fp32 before the cast back."""

    offset = 1.0  # the weight is stored as a delta around zero (llama.cpp's files hold 1 + w)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, plan: StepPlan = PLAIN) -> torch.Tensor:
        if plan.fast:
            return rms_norm(x, self.weight, self.eps, offset=1.0)
        return rms_norm_reference(x, self.weight, self.eps, self.offset)


def make_norm(spec: FamilySpec, dim: int, eps: float) -> nn.Module:
    """transformers' two RMSNorms: Llama's (scale w, after the cast back) and Gemma's (1 + w, in fp32)."""
    if spec.norm_offset == GemmaRMSNorm.offset:
        return GemmaRMSNorm(dim, eps)
    if spec.norm_offset:
        raise ValueError(f"{spec.model_type}: no RMSNorm with offset {spec.norm_offset} (0 or 1 exist)")
    return RMSNorm(dim, eps)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for silu, GeGLU for the gelu variants."""

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which of the plan's layers holds this MLP's fused projections
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.activation = activation_name(config)
        self.act_fn = ACT2FN[self.activation]

    def forward(self, x: torch.Tensor, plan: StepPlan = PLAIN, value_unused: bool = False,
                prenorm: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`value_unused`: the caller only differentiates the output (see fast/lora_mlp.py); the
        plain path ignores it. `prenorm`: the norm to apply to x first, handed over by a decode
        step so the gate/up GEMV normalises x as it reads it (fast/decode_linear.py); `residual`: the
        result is residual + the MLP's output (the down GEMV adds it in its epilogue)."""
        if plan.fast:  # one fused autograd node with the plan's resolved projections
            layer = plan.layer(self.layer_idx)
            stacked = None if layer.adapters is None else (layer.adapters.gate_up, layer.adapters.down)
            out = lora_mlp.lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.activation,
                                    value_unused=value_unused, projections=layer.mlp, gemv_rows=plan.gemv_rows,
                                    prenorm=prenorm, residual=residual, stacked=stacked)
            if out is not None:
                return out
        if prenorm is not None:
            x = prenorm(x, plan)
        out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out if residual is None else residual + out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
    softcap: float | None,
    dropout: float,
) -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), mask bool (B, 1, Tq, Tk) or None -> (B, H, Tq, D).

    SDPA (flash / cuDNN / memory-efficient kernels on GPU) unless the logits are soft-capped,
    which no fused backend supports; then an explicit softmax in fp32 as Gemma 2 specifies.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: FamilySpec, layer_idx: int, sliding: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.scaling = attention_scaling(config, spec)
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.sliding_window = config.sliding_window if sliding else None
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        bias = getattr(config, "attention_bias", False)
        qkv_bias = bias if spec.qkv_bias is None else spec.qkv_bias
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=bias)
        if spec.qk_norm:
            self.q_norm = make_norm(spec, self.head_dim, config.rms_norm_eps)
            self.k_norm = make_norm(spec, self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        masks: LayerMasks,
        cache=None,
        plan: StepPlan = PLAIN,
        prenorm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """On the plan's fast path: fused LoRA q/k/v and o (one autograd node each) and the
        RMSNorm/RoPE kernels. `prenorm`: the norm to apply to x first, handed over by a decode
        step so the q/k/v GEMV normalises x as it reads it (fast/decode_linear.py); `residual`: the
        result is residual + the attention's output (the o GEMV adds it in its epilogue)."""
        fast = plan.fast
        if fast:
            layer = plan.layer(self.layer_idx)
            adapters = layer.adapters  # generation's persistent adapter buffers, or None
            q, k, v = lora_linear.lora_projections(x, [self.q_proj, self.k_proj, self.v_proj], layer.qkv,
                                                   plan.gemv_rows, prenorm, stacked=adapters.qkv if adapters else None)
        else:
            if prenorm is not None:
                x = prenorm(x, plan)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T, _ = x.shape
        q = q.view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q, plan), self.k_norm(k, plan)
        out = None
        if fast and T == 1 and 0 < B <= plan.gemv_rows and self.softcap is None and not self.training \
                and hasattr(cache, "decode_attention"):
            # A decode step: RoPE, the cache write and attention in one kernel (None: it cannot take it).
            out = cache.decode_attention(q.transpose(1, 2), k.transpose(1, 2), v, self.layer_idx,
                                         masks.for_keys(cache.visible)[0], self.scaling, cos_sin)
        if out is None:
            if fast:
                # In place, except on the q/k norm's outputs: those come out of the norm's autograd
                # Function as views, which autograd forbids modifying in place.
                inplace = self.q_norm is None
                q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), *cos_sin, inplace=inplace)  # (B, H|Hkv, T, D)
            else:
                q = rope_reference(q.transpose(1, 2), *cos_sin)  # (B, H, T, D)
                k = rope_reference(k.transpose(1, 2), *cos_sin)  # (B, Hkv, T, D)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, Tk, D)
            mask, causal = masks.for_keys(k.shape[2])
            dropout = self.attention_dropout if self.training else 0.0
            out = _attend(q, k, v, mask, causal, self.scaling, self.softcap, dropout)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        if fast:
            return lora_linear.lora_projections(out, [self.o_proj], layer.o, plan.gemv_rows, residual=residual,
                                                stacked=adapters.o if adapters else None)[0]
        out = self.o_proj(out)
        return out if residual is None else residual + out
