"""Mllama's vision tower forward without the (B, 1, L, L) mask, returning the used tiles only.

transformers' `MllamaVisionModel.forward` builds a float mask (B * images, 1, L, L) from the aspect-ratio mask for its
40 layers, keeps it, its intermediate tensors and the encoder's outputs alive until it returns, and ends by stacking
the five read layer outputs and concatenating them with the last one over every tile: in the snapshot of a
Llama-3.2-11B-Vision QLoRA step (BENCHMARKS.md, session 18) the mask (158 MiB), the stack (157 MiB) and the
concatenation (188 MiB) were half of the forward's peak above the step's start, at batch 2 of 512 px images, which
fill one tile of the 4 each.

This forward runs the same modules in the same order on the same values (transformers' tower arithmetic unchanged),
with three differences that change no value the model uses:
- the layers get the (B * images, L) padding rows instead of the mask (our split attention reads only those,
  mllama_vision_attention.py; the rows are the mask's diagonal, computed here the way transformers builds the mask);
- only the tiles `tiles` lists (mllama_tiles.py: those some text token attends to) are gathered from the last and the
  read layer outputs before they are stacked and concatenated;
- intermediate tensors are released as soon as they are used.

Set per instance (`install_tower_forward`); where the layers' attention is not SDPA (the split forward does not run)
the class's forward runs, and the tiles are gathered from its output.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .mllama_tiles import gather_tiles, select_tile_states, tile_rows


def tile_padding_rows(aspect_ratio_mask: torch.Tensor, patches: int, padded: int) -> torch.Tensor:
    """(B * images, tiles * padded) bool, True at padding rows, from the (B * images, tiles) aspect-ratio mask: the
    diagonal of transformers' `_prepare_aspect_ratio_attention_mask` (a row is padding where its tile is unused or it
    is one of the padded patches; as there, no padded patch (`padded == patches`) marks every row)."""
    n, tiles = aspect_ratio_mask.shape
    real = aspect_ratio_mask.view(n, tiles, 1).bool().repeat(1, 1, padded)  # (n, tiles, padded)
    real[:, :, -(padded - patches):] = False  # transformers' slice: -0 selects every patch
    return ~real.view(n, tiles * padded)


def _splits(vision_model: nn.Module) -> bool:
    attention = vision_model.transformer.layers[0].self_attn
    return hasattr(attention, "_velotune_rows") and attention.config._attn_implementation == "sdpa"


def tower_forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor,
                  tiles: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
    """Set on a MllamaVisionModel: transformers' output, its `last_hidden_state` the states (B, images, tiles,
    patches, D * 6), or with `tiles` (B, C) those tiles' (B, 1, C, patches, D * 6)."""
    if not _splits(self):
        states = type(self).forward(self, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                    aspect_ratio_mask=aspect_ratio_mask, **kwargs).last_hidden_state
        return BaseModelOutput(last_hidden_state=states if tiles is None else select_tile_states(states, tiles))
    B, images, per_image, channels, height, width = pixel_values.shape
    media = B * images
    ids = aspect_ratio_ids.reshape(media, -1)
    weight = self.patch_embedding.weight
    embeds = self.patch_embedding(pixel_values.reshape(media * per_image, channels, height, width).to(
        weight.device, weight.dtype))
    hidden = embeds.flatten(2).transpose(1, 2)  # (media * tiles, P0, D)
    del embeds
    _, patches, D = hidden.shape
    hidden = self.pre_tile_positional_embedding(hidden.reshape(media, per_image, -1, D), ids)
    hidden = self.apply_class_embedding(hidden.reshape(media * per_image, patches, D))
    patches += 1
    hidden = self.gated_positional_embedding(hidden.reshape(media, per_image, patches, D), ids)
    hidden = self.layernorm_pre(hidden)
    padded = patches + (8 - patches % 8) % 8
    hidden = F.pad(hidden, (0, 0, 0, padded - patches), mode="constant", value=0)  # (media, tiles, padded, D)
    padding = tile_padding_rows(aspect_ratio_mask.reshape(media, -1), self.num_patches, padded)
    output = self.transformer(hidden.view(media, -1, D), attention_mask=padding)
    read = [output.hidden_states[i] for i in self.intermediate_layers_indices]  # (media, tiles * padded, D) each
    hidden = self.layernorm_post(output.last_hidden_state)
    del output
    hidden = self.post_tile_positional_embedding(hidden.reshape(media, per_image, padded, D), ids)
    hidden = self.global_transformer(hidden.reshape(media, per_image * padded, D),
                                     attention_mask=padding).last_hidden_state
    if tiles is None:
        rows, out_shape = None, (B, images, per_image, patches)
    else:  # the tiles' rows among every (row, image, tile) of the batch
        rows = tile_rows(tiles, images * per_image)  # (B * C,)
        out_shape = (B, 1, tiles.shape[1], patches)
    states = [(by_tile if rows is None else gather_tiles(by_tile, rows))[:, :patches]  # (n, patches, D) each
              for by_tile in (t.reshape(-1, padded, D) for t in (hidden, *read))]  # (media * tiles, padded, D)
    del hidden, read
    last, stacked = states[0], torch.stack(states[1:], dim=-1)  # (n, patches, D), (n, patches, D, 5)
    del states
    states = torch.cat([last, stacked.flatten(-2)], dim=-1).view(*out_shape, -1)  # (..., patches, D * 6)
    return BaseModelOutput(last_hidden_state=states)


def install_tower_forward(vision_model: nn.Module) -> None:
    """Set `tower_forward` on a MllamaVisionModel instance (transformers' class is unchanged)."""
    vision_model.forward = types.MethodType(tower_forward, vision_model)
