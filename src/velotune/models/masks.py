"""Which key each query may see: causal order, padding, packed-sequence boundaries, windows.

Positions here are absolute indices in the (padded) token stream, not the RoPE position ids:
with left padding the two differ. The keys a cache returns are always the most recent
contiguous span ending at the current token (a sliding-window cache simply keeps fewer), so
their absolute indices follow from the number of keys alone.

When nothing but causal order applies, no mask is built at all and attention runs with
`is_causal=True`, which keeps the fastest SDPA kernels eligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# The largest mask (B x T x T bools) a CUDA-graphed layer reads from a buffer of its own: 16 MiB (batch 4 of 2,048).
MAX_GRAPHED_MASK_ELEMENTS = 16 * 2**20


@dataclass(frozen=True)
class MaskInputs:
    """Everything the per-layer masks depend on, gathered once per forward pass."""

    past_len: int                            # tokens already in the cache
    q_len: int                               # tokens in this call
    padding: torch.Tensor | None             # (B, past_len + q_len) bool, True = real token; None = no padding
    segments: torch.Tensor | None            # (B, q_len) packed-sequence ids; None = one sequence per row
    device: torch.device


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Segment ids from position ids that restart (packing); None when every row is one sequence."""
    restarts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1  # (B, T)
    if not bool(restarts[:, 1:].any()):
        return None
    return restarts.cumsum(-1)


def mask_inputs(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_len: int,
    q_len: int,
    device: torch.device,
) -> MaskInputs:
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D (batch, sequence) of 0/1, got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] < past_len + q_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens but the cache and input hold "
                f"{past_len + q_len}; pass a mask over the whole sequence so far"
            )
        padding = attention_mask[:, -(past_len + q_len):].bool()  # (B, total)
        if bool(padding.all()):
            padding = None
    segments = packed_segments(position_ids) if position_ids is not None and past_len == 0 and q_len > 1 else None
    return MaskInputs(past_len, q_len, padding, segments, device)


class LayerMasks:
    """Masks of the layers sharing one window setting, built once per key count and reused.

    The key count is only known after the cache update (a sliding-window cache returns fewer
    keys than a full one), so layers ask for their mask with it.
    """

    def __init__(self, inputs: MaskInputs, window: int | None):
        self.inputs = inputs
        self.window = window
        self._built: dict[int, tuple[torch.Tensor | None, bool]] = {}

    def graphable(self) -> bool:
        """True when a layer reading these masks may run as a CUDA graph (fast/layer_graphs.py): no cache, so a
        mask has the call's (T, T) shape, and a mask of at most `MAX_GRAPHED_MASK_ELEMENTS`, which the graphs keep
        a copy of (a packed row of 14K tokens would be a 200 MB buffer)."""
        m = self.inputs
        if m.past_len != 0:
            return False
        per_row = m.padding if m.padding is not None else m.segments  # (B, T) or None
        if per_row is None and (self.window is None or m.q_len <= self.window):
            return True  # plain causal: no mask
        rows = 1 if per_row is None else per_row.shape[0]
        return rows * m.q_len * m.q_len <= MAX_GRAPHED_MASK_ELEMENTS

    def for_keys(self, k_len: int) -> tuple[torch.Tensor | None, bool]:
        if k_len not in self._built:
            self._built[k_len] = build_mask(self.inputs, k_len, self.window)
        return self._built[k_len]


def build_mask(m: MaskInputs, k_len: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
    """(bool mask (B|1, 1, Tq, Tk) or None, is_causal) for keys ending at the current token."""
    total = m.past_len + m.q_len
    q_abs = torch.arange(total - m.q_len, total, device=m.device)  # (Tq,)
    k_abs = torch.arange(total - k_len, total, device=m.device)  # (Tk,)
    window_active = window is not None and total > window
    plain = m.padding is None and m.segments is None and not window_active
    if plain:
        # Only causal order matters: one query row sees all cached keys, a square block is causal.
        if m.q_len == 1:
            return None, False
        if k_len == m.q_len:
            return None, True
    allowed = k_abs[None, :] <= q_abs[:, None]  # (Tq, Tk)
    if window_active:
        allowed = allowed & (q_abs[:, None] - k_abs[None, :] < window)
    mask = allowed[None, None]  # (1, 1, Tq, Tk)
    if m.padding is not None:
        mask = mask & m.padding[:, k_abs][:, None, None, :]
    if m.segments is not None:
        mask = mask & (m.segments[:, None, :, None] == m.segments[:, None, None, :])
    # A query row with no visible key (a padding token) would give NaN; let it see every key.
    # Its output is never used, but NaN would leak into gradients.
    return mask | ~mask.any(-1, keepdim=True), False
