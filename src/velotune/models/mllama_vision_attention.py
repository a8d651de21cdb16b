"""Mllama's vision attention as two SDPA calls without a mask per image.

transformers' Mllama tower gives every one of its 40 layers a float mask (B, 1, L, L) from
`_prepare_aspect_ratio_attention_mask`: finfo.min where both the query and the key are padding (the 7 padded patches
of each tile, every patch of the tiles an image does not use) and 0 elsewhere. So a real position attends to every
key, padding included, and a padding position to the real keys only. With an arbitrary mask SDPA runs a masked
kernel (cuDNN's on the H200, 4,128 positions an image at 4 tiles): the H200 profile of a Llama-3.2-11B-Vision QLoRA
step (BENCHMARKS.md, session 16) had attention at half of the step's GPU time, nearly all of it the tower's.

Split by rows, the same attention is two calls without a mask, which run the flash kernels: the real queries over
every key, the padding queries over the real keys (the masked entries' weights are exactly 0 in the masked softmax:
exp of finfo.min). The query rows are gathered per call and the output rows scattered back, the padding queries'
real keys and values gathered (autograd functions whose backwards write one tensor each, `GatherRows` says why);
the sums run in another order than the masked call's, which only changes their rounding. The real rows
are read from the mask's diagonal (entry (i, i) is masked exactly when i is padding), once per mask tensor: the
tower passes one mask to all its layers and the checkpoint's recompute passes it again (one host sync a forward). An
image with no real position (a padded image slot) keeps the masked call, whose output is then the mean of its values.
Our encoder forward (mllama.py `keep_read_states`) hands the layers those (B, L) padding rows instead of the
(B, 1, L, L) mask, so the checkpointed layers do not keep the mask alive until the backward (158 MiB in the 11B step's
snapshot at the backward peak).

Installed per instance like vision_attention.py's Qwen grouping: each layer's `self_attn` keeps its class, its
q/k/v/o Linear layers (LoRA is injected on them later) and its state dict; only its `forward` is set on the instance.
The projections run through tower_lora.py (fused LoRA on the fast path).
Attention other than SDPA (eager, flash-attention requested) runs the class's forward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..fast.plan import RuntimeSettings
from .tower_lora import tower_projections
from .vision_attention import GatherRows, ScatterRows, TensorKeyedCache


@dataclass(frozen=True)
class ImageRows:
    """One image's rows: `real` how many are real; `split` whether its queries run as two calls (real and padding
    rows), else as one (every row real, or none: the masked call)."""

    real: int
    split: bool


@dataclass(frozen=True)
class BatchRows:
    """The batch's split, for the row gathers: `queries` the flattened rows of every SDPA call's queries, call after
    call (`query_sizes` each), `real_keys` the real rows of the split images (`key_sizes` each)."""

    images: list[ImageRows]
    queries: torch.Tensor
    query_sizes: tuple[int, ...]
    real_keys: torch.Tensor | None
    key_sizes: tuple[int, ...]


def padding_rows(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at padding rows, from transformers' (B, 1, L, L) aspect-ratio mask (its diagonal); a (B, L)
    bool is returned as it is."""
    if mask.dim() == 2 and mask.dtype == torch.bool:
        return mask
    return mask[:, 0].diagonal(dim1=-2, dim2=-1) != 0


def image_rows(padding: torch.Tensor) -> BatchRows:
    """The split of each image (one host sync) from its (B, L) padding rows."""
    B, L = padding.shape
    counts = padding.sum(1).tolist()
    flat = torch.arange(B * L, device=padding.device).view(B, L)
    images, queries, keys = [], [], []
    for b, padded in enumerate(counts):
        if padded in (0, L):  # one call over the image's rows: unmasked, or the masked one
            images.append(ImageRows(L - padded, split=False))
            queries.append(flat[b])
            continue
        real, pad = flat[b][~padding[b]], flat[b][padding[b]]  # each in order
        images.append(ImageRows(L - padded, split=True))
        queries += [real, pad]
        keys.append(real)
    return BatchRows(images, torch.cat(queries), tuple(len(t) for t in queries),
                     torch.cat(keys) if keys else None, tuple(len(t) for t in keys))


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor, rows: BatchRows,
                    heads: int, scale: float) -> torch.Tensor:
    """Attention of (B, L, H*D) q, k, v under Mllama's aspect-ratio mask, given as its (B, L) padding rows; returns
    (B, L, H*D). The keys and values of an image's real queries are its rows as they are (unbind: views), the
    queries and the padding queries' real keys are gathered (GatherRows), the outputs scattered back (ScatterRows)."""
    B, L, C = q.shape

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, heads, C // heads).transpose(1, 2)  # (n, H*D) -> (1, H, n, D)

    queries = iter(GatherRows.apply(q.reshape(B * L, C), rows.queries, rows.query_sizes))
    real_k, real_v = ((iter(GatherRows.apply(t.reshape(B * L, C), rows.real_keys, rows.key_sizes)) for t in (k, v))
                      if rows.real_keys is not None else (None, None))
    outputs = []
    for b, (image, kb, vb) in enumerate(zip(rows.images, k.unbind(0), v.unbind(0))):
        kb, vb = by_head(kb), by_head(vb)  # (1, H, L, D)
        if not image.split:
            mask = None
            if image.real == 0:  # no real row: transformers' mask, masked everywhere (uniform weights)
                both = padding[b][:, None] & padding[b][None, :]  # (L, L)
                mask = torch.zeros(L, L, dtype=q.dtype, device=q.device).masked_fill(both, torch.finfo(q.dtype).min)
            outputs.append(F.scaled_dot_product_attention(by_head(next(queries)), kb, vb, attn_mask=mask, scale=scale))
            continue
        outputs.append(F.scaled_dot_product_attention(by_head(next(queries)), kb, vb, scale=scale))  # real: every key
        outputs.append(F.scaled_dot_product_attention(by_head(next(queries)), by_head(next(real_k)),
                                                      by_head(next(real_v)), scale=scale))  # padding: the real keys
    parts = [out.squeeze(0).transpose(0, 1) for out in outputs]  # (n, H, D) each
    return ScatterRows.apply(rows.queries, rows.query_sizes, *parts).view(B, L, C)


def splits(attention: nn.Module, mask: torch.Tensor | None) -> bool:
    """Whether `attention` (a MllamaVisionAttention) runs the split forward for `mask`: SDPA, and a 4D aspect-ratio
    mask or its (B, L) padding rows."""
    return attention.config._attn_implementation == "sdpa" and mask is not None and (
        mask.dim() == 4 or mask.dim() == 2 and mask.dtype == torch.bool)


def split_attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            **kwargs):
    """Set on a MllamaVisionAttention instance: its class's computation with the mask split into rows.
    `attention_mask`: transformers' (B, 1, L, L) mask, or the (B, L) padding rows our encoder passes instead."""
    if not splits(self, attention_mask):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    settings = self._velotune_settings
    padding = padding_rows(attention_mask)  # (B, L)
    q, k, v = tower_projections(settings, hidden_states, (self.q_proj, self.k_proj, self.v_proj))  # (B, L, H*D)
    out = split_attention(q, k, v, padding, self._velotune_rows.get(padding), self.num_heads, self.scaling)
    return tower_projections(settings, out, (self.o_proj,))[0], None


def install_split_attention(vision_model: nn.Module, settings: RuntimeSettings) -> int:
    """Set the split forward on the attention of every layer of both Mllama vision encoders (their projections
    through tower_lora.py under `settings`); returns how many. The layers share one cache of mask splits."""
    cache = TensorKeyedCache(image_rows)
    count = 0
    for encoder in (vision_model.transformer, vision_model.global_transformer):
        for layer in encoder.layers:
            attention = layer.self_attn
            attention._velotune_rows = cache
            attention._velotune_settings = settings
            attention.forward = types.MethodType(split_attention_forward, attention)
            count += 1
    return count
