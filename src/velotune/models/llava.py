"""Llava (and Pixtral, which is Llava with a Pixtral vision tower) with velotune's own text decoder where the
language model is Llama or Mistral (the shared part: composite.py).

transformers' Llava places the projected image features into the raw token embeddings and runs the language
model on them with ordinary (B, T) positions, so our decoder takes the language model's place unchanged. Only
Llama and Mistral text models are adopted: families whose text model transforms given input embeddings (Gemma
scales them) would need that step here too.
"""

from __future__ import annotations

import torch
from transformers.models.llava import modeling_llava

from .composite import OwnTextDecoder

TEXT_FAMILIES = ("llama", "mistral")


class LlavaForConditionalGeneration(OwnTextDecoder, modeling_llava.LlavaForConditionalGeneration):
    """Llava / Pixtral: transformers' vision tower and projector, velotune's Llama or Mistral decoder. Named as
    transformers' class, so `save_pretrained` writes an `architectures` entry transformers loads."""

    _transformers_class = modeling_llava.LlavaForConditionalGeneration

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()

    def _embeddings(self, input_ids, inputs_embeds, pixel_values, vision_feature_layer,
                    vision_feature_select_strategy, image_sizes) -> torch.Tensor:
        """Token embeddings with the projected image features in the image placeholders (transformers' steps)."""
        backbone = self.model
        if inputs_embeds is None:
            inputs_embeds = backbone.language_model.embed(input_ids)  # (B, T, C)
        if pixel_values is None:
            return inputs_embeds
        extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
        features = backbone.get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                               vision_feature_select_strategy=vision_feature_select_strategy,
                                               return_dict=True, **extra).pooler_output
        features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)  # (N, C)
        mask = backbone.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return inputs_embeds.masked_scatter(mask, features)

    def prefill_inputs(self, ids: torch.Tensor, real: torch.Tensor, mm_token_type_ids=None, pixel_values=None,
                       image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None):
        """What velotune's generation engine prefills with: left-padded prompt ids (B, P) and their real-token map
        -> input embeddings (B, P, C) with the image features in place, positions (B, P) counting real tokens from
        0, and each row's next position (B,)."""
        embeds = self._embeddings(ids, None, pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                  image_sizes)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        return embeds, positions, real.long().sum(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        cache=None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ):
        """transformers' Llava forward contract; other kwargs (cache_position, return_dict, ...) are ignored."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self._embeddings(input_ids, inputs_embeds, pixel_values, vision_feature_layer,
                                  vision_feature_select_strategy, image_sizes)  # (B, T, C)
        return self.run_decoder(embeds, attention_mask, position_ids, cache, use_cache, labels, num_items_in_batch,
                                shift_labels, logits_to_keep, return_logits)
