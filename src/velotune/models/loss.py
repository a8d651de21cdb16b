"""Next-token loss with transformers' conventions.

`num_items_in_batch` (the number of non-ignored label tokens across all micro-batches of one
optimizer step, which transformers' Trainer passes) turns the mean into sum / N, so gradient
accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fused_linear_cross_entropy
from ..kernels.cross_entropy import IGNORE_INDEX


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets where position t predicts token t+1; the last is ignored."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(
    logits: torch.Tensor,  # (B, T, V)
    labels: torch.Tensor | None = None,  # (B, T), unshifted
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,  # (B, T), already shifted (packing collators give these)
) -> torch.Tensor:
    targets = shift_labels if shift_labels is not None else shift_labels_of(labels)
    targets = targets.reshape(-1).to(logits.device)
    flat = logits.float().reshape(-1, logits.shape[-1])  # (B*T, V)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="mean")
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def fused_causal_lm_loss(
    hidden: torch.Tensor,  # (B, T, C), the final norm's output
    weight: torch.Tensor,  # (V, C), the output embedding
    labels: torch.Tensor | None = None,  # (B, T), unshifted
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,  # (B, T), already shifted
    softcap: float | None = None,  # Gemma 2's final_logit_softcapping
) -> torch.Tensor:
    """`causal_lm_loss(lm_head(hidden), ...)` without building the (B, T, V) logits: the fused
    linear cross-entropy kernel works through the tokens in chunks."""

    targets = shift_labels if shift_labels is not None else shift_labels_of(labels)
    targets = targets.reshape(-1).to(hidden.device)  # (B*T,)
    return fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, ignore_index=IGNORE_INDEX, softcap=softcap,
        num_items_in_batch=num_items_in_batch, reduction="mean",
    )
