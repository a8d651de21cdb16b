"""Qwen2-VL / Qwen2.5-VL vision attention in one SDPA call per distinct chunk length.

transformers' vision attention (both families, every 5.x we run) attends within the chunks `cu_seqlens` marks
(one per image, or per window in Qwen2.5-VL's windowed layers). Without flash-attention it splits q/k/v at those
bounds and calls SDPA once per chunk, after a `.tolist()` host sync in every layer: two 512 px images are ~50
windows, so a Qwen2.5-VL-7B vision forward makes ~1,400 SDPA calls (28 windowed layers), again in the
checkpoint's recompute, and the H200 profile showed the tower at 235 ms of host time for 31 ms of GPU time.

Chunks of one length attend alike, so they can run as one batch: the rows are gathered into chunk order
grouped by length, each group viewed as (n_chunks, heads, L, head_dim) for a single SDPA call, and the output
rows scattered back (`GatherRows` / `ScatterRows`: one tensor written by each backward). Windows come in few lengths (full windows, edge strips, one corner),
so a layer makes ~3 SDPA calls. The grouping is computed once per `cu_seqlens` tensor (one host sync per
vision forward and kind of layer, not per layer) and shared by the tower's blocks; the recompute in backward
passes the same tensor, so it finds the grouping too.

It is installed per instance (`install_grouped_attention`): each block's attention module keeps its class,
its `qkv` / `proj` Linear layers (LoRA wrappers injected on them later keep working, and PEFT's targeting
finds them under the same names) and its state dict; only its `forward` is set on the instance. When the
tower's attention is not SDPA (flash-attention requested, eager), the class's forward runs unchanged. The qkv and
proj projections run through tower_lora.py (fused LoRA on the fast path).
"""

from __future__ import annotations

import sys
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..fast.plan import RuntimeSettings
from .tower_lora import tower_projections


@dataclass(frozen=True)
class ChunkGroups:
    """The chunks of one `cu_seqlens`, grouped by length. `perm` (S,) lists the rows chunk by chunk, groups
    one after another; None when that order is the rows' own (one length, in order). `spans` holds (first row in
    `perm` order, number of chunks, chunk length) per group."""

    perm: torch.Tensor | None
    spans: tuple[tuple[int, int, int], ...]


def group_chunks(cu_seqlens: torch.Tensor, rows: int) -> ChunkGroups:
    """Group the chunks `cu_seqlens` (n + 1,) bounds by length (one host sync)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != rows:
        raise ValueError(f"cu_seqlens spans rows {bounds[0]}..{bounds[-1]}, the hidden states have {rows}")
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    spans, first = [], 0
    for length, starts in starts_by_length.items():
        spans.append((first, len(starts), length))
        first += len(starts) * length
    if len(starts_by_length) == 1:  # one length: the chunks are already consecutive rows of one shape
        return ChunkGroups(None, tuple(spans))
    perm = torch.cat([(torch.tensor(starts)[:, None] + torch.arange(length)).flatten()
                      for length, starts in starts_by_length.items()])  # (S,) on the host
    return ChunkGroups(perm.to(cu_seqlens.device, non_blocking=True), tuple(spans))


class TensorKeyedCache:
    """`compute(tensor, *args)` for the last few tensors, found by identity and version: a tower passes the same
    tensor (Qwen's `cu_seqlens`, Mllama's padding rows) to each of its layers, and the checkpoint's recompute passes
    it again, so one host sync serves them all. Shared by one tower's layers."""

    def __init__(self, compute, size: int = 4):
        self.compute, self.size = compute, size
        self.entries: list[tuple[weakref.ref, int, object]] = []

    def get(self, tensor: torch.Tensor, *args):
        for ref, version, value in self.entries:
            if ref() is tensor and version == tensor._version:
                return value
        value = self.compute(tensor, *args)
        self.entries = [(weakref.ref(tensor), tensor._version, value)] + self.entries[: self.size - 1]
        return value


class GatherRows(torch.autograd.Function):
    """x (M, C) -> its rows `index` in consecutive parts of `sizes` rows, each its own tensor.

    Backward writes every part's gradient into one (M, C) tensor (index_copy_; zeros first only where `index` does
    not reach every row or a part has no gradient). Why not indexing and slices: their backwards each fill a zero
    tensor of their input's size, which the engine then sums; in the CPU replay of Llama-3.2-11B-Vision's step
    (BENCHMARKS.md, session 17) five such (N, C) zero tensors of the tower's attention were alive at the step's peak.
    Both towers' attention (Qwen-VL's chunk groups here, Mllama's real/padding rows) gather and scatter through these."""

    @staticmethod
    def forward(ctx, x, index, sizes):
        ctx.save_for_backward(index)
        ctx.rows, ctx.sizes = x.shape[0], sizes
        return tuple(x.index_select(0, part) for part in index.split(sizes))

    @staticmethod
    def backward(ctx, *grads):
        (index,) = ctx.saved_tensors
        first = next(g for g in grads if g is not None)
        covered = index.numel() == ctx.rows and all(g is not None for g in grads)
        out = (first.new_empty if covered else first.new_zeros)((ctx.rows, *first.shape[1:]))  # (M, C)
        for part, grad in zip(index.split(ctx.sizes), grads):
            if grad is not None:
                out.index_copy_(0, part, grad)
        return out, None, None


class ScatterRows(torch.autograd.Function):
    """Parts (n_i, ...) written to the rows `index` (consecutive parts of `sizes`) of one (M, ...) tensor, every row
    covered; backward gathers each part's rows of the gradient."""

    @staticmethod
    def forward(ctx, index, sizes, *parts):
        ctx.save_for_backward(index)
        ctx.sizes = sizes
        out = parts[0].new_empty((index.numel(), *parts[0].shape[1:]))
        for rows, part in zip(index.split(sizes), parts):
            out.index_copy_(0, rows, part)
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return (None, None, *(grad.index_select(0, rows) for rows in index.split(ctx.sizes)))


def grouped_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                              max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """Set on a Qwen-VL vision attention instance: its class's computation, one SDPA call per chunk length."""
    if self.config._attn_implementation != "sdpa" or position_embeddings is None:
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    rows = hidden_states.shape[0]
    heads = self.num_heads
    qkv = tower_projections(self._velotune_settings, hidden_states, (self.qkv,))[0]  # (S, 3 * H * D)
    q, k, v = qkv.reshape(rows, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, D) each
    cos, sin = position_embeddings
    q, k = self._velotune_rotary(q, k, cos, sin)
    groups = self._velotune_chunks.get(cu_seqlens, rows)
    sizes = tuple(chunks * length for _, chunks, length in groups.spans)
    if groups.perm is not None:  # each group's rows, chunk after chunk: [(n_g * L_g, H, D)] for q, k and v
        parts = [GatherRows.apply(t, groups.perm, sizes) for t in (q, k, v)]
    else:  # one length, the chunks consecutive already
        parts = [(t,) for t in (q, k, v)]
    dropout = self.attention_dropout if self.training else 0.0
    outputs = []
    for g, (_, chunks, length) in enumerate(groups.spans):
        qg, kg, vg = (p[g].reshape(chunks, length, heads, -1).transpose(1, 2) for p in parts)  # (n, H, L, D)
        out = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=self.scaling)  # (n, H, L, D)
        outputs.append(out.transpose(1, 2).reshape(chunks * length, -1))  # (n*L, H*D)
    out = ScatterRows.apply(groups.perm, sizes, *outputs) if groups.perm is not None else outputs[0]  # (S, C)
    return tower_projections(self._velotune_settings, out, (self.proj,))[0]


def _rotary_of(attention: nn.Module):
    """The family's `apply_rotary_pos_emb_vision` (the module that defines the attention's class)."""
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision


def install_grouped_attention(visual: nn.Module, settings: RuntimeSettings | None = None) -> int:
    """Set the grouped forward on the attention of each of `visual.blocks` (a Qwen2-VL / Qwen2.5-VL vision
    tower), its projections through tower_lora.py under `settings` (None: the modules' own calls); returns how many.
    The blocks share one grouping cache."""
    cache = TensorKeyedCache(group_chunks)
    count = 0
    for block in visual.blocks:
        attention = block.attn
        attention._velotune_rotary = _rotary_of(attention)
        attention._velotune_chunks = cache
        attention._velotune_settings = settings
        attention.forward = types.MethodType(grouped_attention_forward, attention)
        count += 1
    return count
