"""The image tiles Mllama's cross-attention can see: the others leave before the projector.

Mllama's processor pads every image to the model's `max_num_tiles` tiles (4 for Llama 3.2 Vision) and every row to
the batch's largest image count; its cross-attention mask (B, T, images, tiles) marks, per text token, the tiles of
the image it may attend to. A tile no token of its row attends to (a padding tile: a 512 px image fills one 560 px
tile of 4; a padded image slot) is masked for every query of that row, so its keys get exactly 0 weight in the
softmax (exp of finfo.min), and text rows that see no tile at all are zeroed after the attention by transformers'
full-text-row mask whatever their keys. Such tiles change no output and get no gradient, yet transformers projects
them (the projector, 7680 -> 4096) and every cross-attention layer computes, normalises and expands their keys and
values to every query head. In a Llama-3.2-11B-Vision QLoRA step at 512 px (BENCHMARKS.md, session 18) three
quarters of those rows were padding tiles, and one cross layer's expanded keys and values (2 x 100 MiB), its
normalised keys (50 MiB) and the projector's output (100 MiB) stood at the step's memory peak.

`used_tiles` picks, per row, the tiles some token attends to (one host sync); the tower returns those tiles only
(mllama_tower.py gathers them before stacking its read layer outputs; `GatherRows`, whose backward writes each
gradient once, zeros at the left-out tiles, which the tower's layers need whole anyway), and the mask keeps the same
columns. Rows with fewer used tiles than the batch's largest count take some of their unused tiles along, still
masked. The tower itself still runs every
tile: its layers' real positions attend to the padding ones (mllama_vision_attention.py). Only calls without a KV
cache compact: a cached generation keeps the cross layers' keys for every tile, which later calls' masks index.
"""

from __future__ import annotations

import torch

from .vision_attention import GatherRows


def used_tiles(cross_attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, C) indices into each row's images * tiles, the tiles some token of the row attends to first (in order), C
    the largest count of the batch; None when every tile is used (nothing to leave out). Mask: (B, T, images, tiles)."""
    used = cross_attention_mask.bool().any(1).flatten(1)  # (B, images * tiles)
    keep = max(int(used.sum(1).max()), 1)  # one host sync
    if keep == used.shape[1]:
        return None
    return torch.sort((~used).to(torch.int8), dim=1, stable=True).indices[:, :keep]  # used tiles first, in order


def tile_rows(tiles: torch.Tensor, per_row: int) -> torch.Tensor:
    """(B, C) tile indices within each row's `per_row` (images * tiles) -> (B * C,) indices among the batch's."""
    return (tiles + torch.arange(tiles.shape[0], device=tiles.device)[:, None] * per_row).flatten()


def gather_tiles(by_tile: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(M, ...) per tile of the batch -> (n, ...): the tiles `rows` (n,) lists (GatherRows: one gradient write)."""
    (picked,) = GatherRows.apply(by_tile.reshape(by_tile.shape[0], -1), rows, (rows.numel(),))
    return picked.view(rows.numel(), *by_tile.shape[1:])


def select_tile_states(states: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """The tower's output (B, images, tiles, patches, D) -> (B, 1, C, patches, D): the tiles `tiles` (B, C) lists."""
    B, images, per_image = states.shape[:3]
    picked = gather_tiles(states.flatten(0, 2), tile_rows(tiles, images * per_image))  # (B * C, patches, D)
    return picked.view(B, 1, tiles.shape[1], *states.shape[3:])


def select_tile_mask(cross_attention_mask: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """The processor's mask (B, T, images, tiles) -> (B, T, 1, C): the columns of the tiles `tiles` (B, C) lists."""
    B, T = cross_attention_mask.shape[:2]
    flat = cross_attention_mask.reshape(B, T, -1)  # (B, T, images * tiles)
    return flat.gather(2, tiles[:, None, :].expand(B, T, tiles.shape[1])).unsqueeze(2)
