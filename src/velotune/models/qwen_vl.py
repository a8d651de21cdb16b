"""Qwen2-VL and Qwen2.5-VL with velotune's own text decoder.

The language model of both families is Qwen2 (q/k/v biases, SwiGLU, RMSNorm) with multimodal RoPE,
so it is our `DecoderModel` configured by the qwen2 `FamilySpec`; its rotary tables read
`mrope_section` (rope.py). Everything else stays transformers': the vision tower and its merger,
how image features are placed into the embeddings, and the M-RoPE position ids (`get_rope_index`,
through `compute_3d_position_ids`, so the positions are theirs exactly).

The classes subclass transformers' own and keep its module tree and names: `model.visual`,
`model.language_model` (ours, parameter names identical to transformers' text model) and `lm_head`.
So transformers' `from_pretrained` fills our decoder directly from a checkpoint (no copy), saved
folders name transformers' class and load there, PEFT adapters and the vision layer groups
(vision/families.py) are unchanged. `forward` is ours: embeddings and image features, positions,
our decoder under the step plan (fused LoRA, offloaded checkpointing), then our loss (the fused
linear cross-entropy in training, so the (B, T, V) logits are never built).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from ..fast.plan import plan_step
from .decoder import DecoderModel, head_outputs
from .spec import FAMILIES

_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(MultimodalCausalLMOutputWithPast)}
                else "past_key_values")


class _OwnTextDecoder:
    """The composite forward over transformers' vision parts and our decoder (mixed into both families)."""

    _transformers_class: type  # the transformers class the family subclasses
    family = "qwen2"  # the FamilySpec of the language model

    def _install_decoder(self) -> None:
        # transformers' __init__ built its text model; ours takes its place under the same name.
        self.model.language_model = DecoderModel(self.config.get_text_config(), FAMILIES[self.family])

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader with its checkpoint conversions (Qwen2-VL folders store the text model as
        `model.layers...`; transformers applies its renames only to its own classes), then `adopt`."""
        return cls.adopt(cls._transformers_class.from_pretrained(*args, **kwargs))

    @classmethod
    def adopt(cls, reference):
        """Our class over the modules of transformers' loaded model `reference` (which is consumed): its vision
        tower, merger, lm_head and generation config are taken as they are, and the text model's linear layers,
        embeddings and norm weights move into our decoder, so every tensor is shared (4-bit layers included).
        Only the rotary tables are computed anew."""
        with torch.device("meta"):
            model = cls(reference.config)
        decoder = model.model.language_model  # on the meta device, filled below
        adopt_modules(decoder, reference.model.language_model)
        device = decoder.embed_tokens.weight.device
        for rope in decoder.rotary_emb.values():
            rope.reset_frequencies()
            rope.to(device)
        reference.model.language_model = decoder
        model.model = reference.model  # transformers' backbone: vision tower, merger, rope index state
        model.lm_head = reference.lm_head
        model.generation_config = reference.generation_config
        model.name_or_path = reference.name_or_path
        return model.train(reference.training)

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
                video_grid_thw=video_grid_thw, attention_mask=attention_mask, cache=cache,
                mm_token_type_ids=mm_token_type_ids, **extra)
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

    def generate(self, *args, **kwargs):
        """transformers' generate; after `FastVisionModel.for_inference` velotune's engine runs it (the prefill
        through `prefill_inputs`, the decode steps on our decoder's fast path)."""
        engine = getattr(self, "generation_engine", None)
        if engine is not None:
            return engine.generate(self, super().generate, *args, **kwargs)
        return super().generate(*args, **kwargs)

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
    ) -> MultimodalCausalLMOutputWithPast:
        """transformers' Qwen2-VL forward contract; other kwargs (cache_position, return_dict, ...) are ignored.
        Training with labels on the fast path returns `logits=None` unless `return_logits=True` (as our causal LMs)."""
        decoder = self.model.language_model
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        text_config = decoder.config
        cached = bool(use_cache if use_cache is not None else text_config.use_cache and not self.training)
        embeds = self._embeddings(input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos,
                                  video_grid_thw)  # (B, T, C)
        extra = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
        positions = self._positions(position_ids, input_ids, embeds, attention_mask, cache if cached else None,
                                    image_grid_thw, video_grid_thw, mm_token_type_ids, extra)
        has_labels = labels is not None or shift_labels is not None
        plan = plan_step(decoder, training=self.training, grad=torch.is_grad_enabled(), labels=has_labels,
                         return_logits=return_logits, tokens=embeds.shape[0] * embeds.shape[1], cache=cached)
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, cache=cache,
                      use_cache=use_cache, plan=plan)
        loss, logits = head_outputs(self.lm_head, out.last_hidden_state, plan, labels, num_items_in_batch,
                                    shift_labels, logits_to_keep)
        return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits,
                                                **{_CACHE_FIELD: getattr(out, _CACHE_FIELD, None)})


class Qwen2VLForConditionalGeneration(_OwnTextDecoder, modeling_qwen2_vl.Qwen2VLForConditionalGeneration):
    """Qwen2-VL: transformers' vision tower and merger, velotune's Qwen2 decoder with M-RoPE. Named as
    transformers' class, so `save_pretrained` writes an `architectures` entry transformers loads."""

    _no_split_modules = ["DecoderLayer", "Qwen2VLVisionBlock"]
    _transformers_class = modeling_qwen2_vl.Qwen2VLForConditionalGeneration

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()


class Qwen2_5_VLForConditionalGeneration(_OwnTextDecoder, modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL: as Qwen2VLForConditionalGeneration (its vision tower differs; the language model does not)."""

    _no_split_modules = ["DecoderLayer", "Qwen2_5_VLVisionBlock"]
    _transformers_class = modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()


def adopt_modules(ours: nn.Module, theirs: nn.Module) -> None:
    """Move the weights of transformers' text model `theirs` into our decoder `ours` (same dotted names):
    each leaf module that holds weights (Linear, bitsandbytes' Linear4bit, Embedding) is taken whole, each
    norm's weight Parameter is taken into our norm (our norm classes compute the family's formula). A name
    transformers has and we lack, or the reverse, is an error naming it."""
    our_leaves = {name: m for name, m in ours.named_modules() if not list(m.children()) and _has_weights(m)}
    their_leaves = {name: m for name, m in theirs.named_modules() if not list(m.children()) and _has_weights(m)}
    if our_leaves.keys() != their_leaves.keys():
        raise ValueError(f"velotune's decoder and transformers' text model differ in layers: only ours "
                         f"{sorted(our_leaves.keys() - their_leaves.keys())[:4]}, only theirs "
                         f"{sorted(their_leaves.keys() - our_leaves.keys())[:4]}")
    for name, module in their_leaves.items():
        if hasattr(module, "variance_epsilon") or "RMSNorm" in type(module).__name__:
            our_leaves[name].weight = module.weight
        else:
            ours.set_submodule(name, module)


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


OWN_DECODER_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration,
                       "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def own_decoder_class(config):
    """Our composite class for a vision-language config whose language model is one of our decoders, or None."""
    return OWN_DECODER_CLASSES.get(getattr(config, "model_type", None))
