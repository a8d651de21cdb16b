"""Qwen2-VL and Qwen2.5-VL with velotune's own text decoder (the shared part: composite.py).

The language model of both families is Qwen2 (q/k/v biases, SwiGLU, RMSNorm) with multimodal RoPE, so it is
our `DecoderModel` with the qwen2 `FamilySpec`, whose rotary tables read `mrope_section` (rope.py). The
vision tower, its merger, how image features are placed into the embeddings, and the M-RoPE position ids
(`get_rope_index` through `compute_3d_position_ids`) stay transformers', so the positions are theirs exactly.
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from .composite import OwnTextDecoder
from .tower_lora import install_fused_mlps
from .vision_attention import install_grouped_attention

# The cache's keyword in transformers' compute_3d_position_ids: `cache` from 5.2x, `past_key_values` in 5.17.
_CACHE_ARG = ("cache" if "cache" in inspect.signature(modeling_qwen2_vl.Qwen2VLModel.compute_3d_position_ids).parameters
              else "past_key_values")


class QwenVLDecoder(OwnTextDecoder):
    """Qwen2-VL's composite forward over transformers' vision parts and our decoder (both Qwen families)."""

    @classmethod
    def text_family(cls, config) -> str:
        return "qwen2"  # the text config's model_type is qwen2_vl_text / qwen2_5_vl_text

    @classmethod
    def adopt(cls, reference):
        """As OwnTextDecoder.adopt, and the vision tower's attention runs one SDPA call per chunk length
        (vision_attention.py; transformers' per-chunk loop where the tower's attention is not SDPA), its projections
        through our fused LoRA on the fast path (tower_lora.py)."""
        model = super().adopt(reference)
        settings = model.model.language_model.runtime
        install_grouped_attention(model.model.visual, settings)
        install_fused_mlps(((block.mlp, None) for block in model.model.visual.blocks), settings)  # x + mlp(norm(x))
        return model

    def _embeddings(self, input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos,
                    video_grid_thw) -> torch.Tensor:
        """Token embeddings with the vision tower's merged patch features in the image/video placeholders."""
        backbone = self.model
        if inputs_embeds is None:
            inputs_embeds = backbone.language_model.embed(input_ids)  # (B, T, C)
        for pixels, grid, kind in ((pixel_values, image_grid_thw, "image"), (pixel_values_videos, video_grid_thw,
                                                                               "video")):
            if pixels is None:
                continue
            encode = backbone.get_image_features if kind == "image" else backbone.get_video_features
            features = torch.cat(encode(pixels, grid, return_dict=True).pooler_output, dim=0)  # (N, C)
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, video_mask = backbone.get_placeholder_mask(
                input_ids, inputs_embeds=inputs_embeds, **{f"{kind}_features": features})
            inputs_embeds = inputs_embeds.masked_scatter(image_mask if kind == "image" else video_mask, features)
        return inputs_embeds

    def _positions(self, position_ids, input_ids, inputs_embeds, attention_mask, cache, image_grid_thw,
                   video_grid_thw, mm_token_type_ids, extra) -> torch.Tensor:
        """(3, B, T) M-RoPE ids, or (4, B, T) with text ids first as transformers' generate passes them."""
        B, T, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = self.model.compute_3d_position_ids(
                input_ids=input_ids, inputs_embeds=inputs_embeds, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                **{_CACHE_ARG: cache}, **extra)
        if position_ids is None:  # text only: consecutive ids on all three axes, as transformers' text model
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None, None].expand(3, B, -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)  # (3, B, T)
        return position_ids

    def prefill_inputs(self, ids: torch.Tensor, real: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                       pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                       second_per_grid_ts=None):
        """What velotune's generation engine prefills with: left-padded prompt ids (B, P) and their real-token
        map -> input embeddings (B, P, C) with the image features in place, M-RoPE ids (3, B, P) from
        transformers' `get_rope_index`, and each row's next position (B,): one past its largest id, which the
        text-only decode steps count on from (transformers' `rope_deltas` plus the prompt length)."""
        embeds = self._embeddings(ids, None, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if mm_token_type_ids is None:  # text only: consecutive ids over the real tokens
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)  # (3, B, P)
        else:
            extra = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
            positions, _ = self.model.get_rope_index(ids, mm_token_type_ids=mm_token_type_ids,
                                                     image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                                     attention_mask=real.long(), **extra)
        next_positions = positions.masked_fill(~real.bool()[None], 0).amax(dim=(0, 2)) + 1  # (B,)
        return embeds, positions, next_positions

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **kwargs,
    ):
        """transformers' Qwen2-VL forward contract; other kwargs (cache_position, return_dict, ...) are ignored."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self._embeddings(input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos,
                                  video_grid_thw)  # (B, T, C)
        extra = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
        positions = self._positions(position_ids, input_ids, embeds, attention_mask,
                                    cache if self.uses_cache(use_cache) else None, image_grid_thw, video_grid_thw,
                                    mm_token_type_ids, extra)
        return self.run_decoder(embeds, attention_mask, positions, cache, use_cache, labels, num_items_in_batch,
                                shift_labels, logits_to_keep, return_logits)


class Qwen2VLForConditionalGeneration(QwenVLDecoder, modeling_qwen2_vl.Qwen2VLForConditionalGeneration):
    """Qwen2-VL: transformers' vision tower and merger, velotune's Qwen2 decoder with M-RoPE. Named as
    transformers' class, so `save_pretrained` writes an `architectures` entry transformers loads."""

    _no_split_modules = ["DecoderLayer", "Qwen2VLVisionBlock"]
    _transformers_class = modeling_qwen2_vl.Qwen2VLForConditionalGeneration

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()


class Qwen2_5_VLForConditionalGeneration(QwenVLDecoder, modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL: as Qwen2VLForConditionalGeneration (its vision tower differs; the language model does not)."""

    _no_split_modules = ["DecoderLayer", "Qwen2_5_VLVisionBlock"]
    _transformers_class = modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()
