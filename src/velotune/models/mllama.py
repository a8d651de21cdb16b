"""Mllama (Llama 3.2 Vision) with velotune's own text decoder (the shared part: composite.py).

Mllama's language model is Llama (its embedding has 8 rows past `vocab_size`, for the image tokens) with
cross-attention layers into the image at `config.cross_attention_layers` (every fifth layer of the 11B). The
self-attention layers are our `DecoderLayer`s, so they run the fast path (fused LoRA, kernels, our layer
checkpoint, CUDA graphs); the cross-attention layers stay transformers' `MllamaCrossAttentionDecoderLayer`
modules, taken whole from the loaded model (weights shared, names unchanged: `model.language_model.layers.N.
cross_attn.q_proj`), so PEFT's target modules, the vision layer groups, save_pretrained and merged exports are
transformers' exactly. Our decoder runs them as "borrowed" layers (decoder.py `borrowed_call`): called with
transformers' arguments and skipped exactly where transformers' text model skips them (no image states given and
none cached for the layer). Why transformers' module for those: it keeps parity with each release for free, and
the 32 self-attention layers of the 11B's 40 are where most of the step goes; their projections run our fused LoRA
(tower_lora.py) and their attention our grouped-query forward without copies of the image's keys and values
(mllama_cross_attention.py), both set on the instances.

The vision side computes what transformers' `MllamaModel.forward` computes: the vision tower, the projector, the
cross-attention mask expanded per image token (`_prepare_cross_attention_mask`) and sliced to the tokens of the
call when a cache holds earlier ones; a call without a cache leaves the tiles no token attends to out of the
projector and the cross-attention layers (mllama_tiles.py). Generation runs transformers' loop over this model (the
image's keys and values cached by the cross layers at their layer index, as transformers does); velotune's engine
does not serve it (its static cache holds self-attention keys only; inference/engine.py says so in the log).

The vision tower is transformers' modules with changes set on its instances (`install_tower`): its forward is ours
(mllama_tower.py: no (B, 1, L, L) mask, the used tiles stacked only), its encoders keep only the layer outputs the
tower reads (`keep_read_states`: transformers' encoder holds every layer's output until the tower returns, of which
the tower reads five) and hand the layers the padding rows, its attention runs as two SDPA calls without a mask
(mllama_vision_attention.py), and its projections, MLPs and the projector run our fused LoRA on the fast path
(tower_lora.py).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama import modeling_mllama

from ..fast.plan import RuntimeSettings
from .composite import OwnTextDecoder
from .decoder import DecoderModel
from .mllama_cross_attention import install_cross_attention
from .mllama_tiles import select_tile_mask, used_tiles
from .mllama_tower import install_tower_forward
from .mllama_vision_attention import install_split_attention, padding_rows, splits
from .tower_lora import install_fused_mlps, tower_projections

# The cache's keyword of transformers' cross-attention layer: `cache` from 5.2x, `past_key_values` in 5.17.
_CACHE_ARG = ("cache" if "cache" in inspect.signature(modeling_mllama.MllamaCrossAttentionDecoderLayer.forward)
              .parameters else "past_key_values")
EXTRA_EMBEDDING_ROWS = 8  # transformers' MllamaTextModel: vocab_size + 8 rows


def holds_image(cache, index: int) -> bool:
    """Whether cross-attention layer `index` has the image's keys/values in `cache` (transformers' test in both
    5.17 and 5.2x: an initialized cache layer with keys)."""
    if cache is None or index >= len(getattr(cache, "layers", ())):
        return False
    layer = cache.layers[index]
    keys = getattr(layer, "keys", None)
    return bool(getattr(layer, "is_initialized", True)) and keys is not None and keys.numel() > 0


def _encoder_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' MllamaVisionEncoder.forward, with the outputs of the layers outside `self._velotune_kept` left
    out of `hidden_states` (None in their places, so the tower's `hidden_states[i]` still reads layer i). Where the
    layers' attention is split (mllama_vision_attention.py) they get the mask's (B, L) padding rows instead of it."""
    kept = self._velotune_kept
    attention = self.layers[0].self_attn
    if hasattr(attention, "_velotune_rows") and splits(attention, attention_mask):  # (B, L) padding rows, not the mask
        attention_mask = padding_rows(attention_mask)
    states = []
    for index, layer in enumerate(self.layers):
        hidden_states = layer(hidden_states, attention_mask=attention_mask)  # (B * images, tiles * patches, Dv)
        states.append(hidden_states if index in kept else None)
    # After the last layer, so that autograd's engine (which runs the ready node made last first) copies their
    # gradients out before the backward of any of these layers (OwnGradient says why).
    states = [None if state is None else OwnGradient.apply(state) for state in states]
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(states))


class OwnGradient(torch.autograd.Function):
    """The identity, whose backward copies the gradient it gets into a tensor of its own.

    Why: the tower stacks the layer outputs it reads (torch.stack along a new last axis), so their gradients arrive
    as strided views of one buffer, which stays alive until the last of them is consumed: layer 3's, by then at the
    end of the tower's backward, where the step's peak is (LoRA gradients have accumulated). On the 11B at batch 2
    that buffer is 157 MiB (BENCHMARKS.md, session 17); copied out (the same bytes, once), each gradient is freed
    when its layer's backward has added it in. The copies must be made before those layers' backward: autograd's
    engine runs the ready node created last first, so these nodes are created after the encoder's last layer."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(memory_format=torch.contiguous_format)


def keep_read_states(vision_model: nn.Module) -> None:
    """The local encoder keeps the outputs of `intermediate_layers_indices` only, the global encoder none.

    Why: transformers' encoder collects every layer's output into the `hidden_states` it returns, and the tower holds
    that tuple until it returns, through the 8 global layers, although it reads five of the 32 (its intermediate
    layers, concatenated into the projector's input). Under gradient checkpointing these were the largest thing
    alive at the forward's peak (BENCHMARKS.md, session 14: Llama-3.2-11B-Vision, batch 2, 40 x 63 MiB). Set on
    the two encoder instances (transformers' classes are unchanged); the layers run as transformers calls them,
    so the checkpointing each layer has (foreign_checkpoints.py) applies unchanged."""
    for encoder, kept in ((vision_model.transformer, vision_model.intermediate_layers_indices),
                          (vision_model.global_transformer, ())):
        encoder._velotune_kept = frozenset(kept)
        encoder.forward = types.MethodType(_encoder_forward, encoder)


def install_tower(vision_model: nn.Module, settings: RuntimeSettings) -> None:
    """Set on transformers' vision tower's instances: its forward (mllama_tower.py), its encoders keep the states it
    reads, its attention runs without the mask (mllama_vision_attention.py says why), its projections and MLPs
    through our fused LoRA on the fast path (tower_lora.py), under our decoder's `settings`."""
    keep_read_states(vision_model)
    install_split_attention(vision_model, settings)
    install_tower_forward(vision_model)
    install_fused_mlps(((layer.mlp, layer.gate_ffn if layer.is_gated else None)  # x + [tanh(gate) *] mlp(norm(x))
                        for encoder in (vision_model.transformer, vision_model.global_transformer)
                        for layer in encoder.layers), settings)


class MllamaTextDecoder(DecoderModel):
    """Llama's decoder with transformers' cross-attention layers at `config.cross_attention_layers`."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.embed_tokens = nn.Embedding(config.vocab_size + EXTRA_EMBEDDING_ROWS, config.hidden_size,
                                         getattr(config, "pad_token_id", None))

    def make_layer(self, index: int, kind: str) -> nn.Module:
        if index in self.config.cross_attention_layers:
            return modeling_mllama.MllamaCrossAttentionDecoderLayer(self.config, index)
        return super().make_layer(index, kind)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cross_attention_states=None,
                cross_attention_mask=None, full_text_row_masked_out_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, plan=None, borrowed=None, **kwargs):
        """transformers' MllamaTextModel.forward contract (the image arguments as it takes them); other kwargs as
        DecoderModel.forward."""
        if borrowed is None:
            borrowed = dict(cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
                            full_text_row_masked_out_mask=full_text_row_masked_out_mask)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               cache=cache, plan=plan, borrowed=borrowed)

    def borrowed_call(self, index: int, layer: nn.Module, cache, inputs: dict):
        """transformers' text model's call of a cross-attention layer: skipped when it has neither image states
        (B, N, C) nor their keys/values in the cache (a text-only call)."""
        states = inputs.get("cross_attention_states")
        if states is None and not holds_image(cache, index):
            return None
        # attention_mask: unused by the layer (its mask is the cross-attention one), but a required argument
        return functools.partial(layer, cross_attention_states=states,
                                 cross_attention_mask=inputs.get("cross_attention_mask"), attention_mask=None,
                                 full_text_row_masked_out_mask=inputs.get("full_text_row_masked_out_mask"),
                                 **{_CACHE_ARG: cache})


class MllamaForConditionalGeneration(OwnTextDecoder, modeling_mllama.MllamaForConditionalGeneration):
    """Llama 3.2 Vision: transformers' vision tower, projector and cross-attention layers, velotune's Llama decoder
    for the self-attention layers. Named as transformers' class, so `save_pretrained` writes an `architectures`
    entry transformers loads."""

    _no_split_modules = ["DecoderLayer", "MllamaCrossAttentionDecoderLayer", "MllamaVisionEncoderLayer"]
    _transformers_class = modeling_mllama.MllamaForConditionalGeneration
    _decoder_class = MllamaTextDecoder

    def __init__(self, config):
        super().__init__(config)
        self._install_decoder()
        self._install_transformers_parts()

    @classmethod
    def adopt(cls, reference):
        model = super().adopt(reference)
        model._install_transformers_parts()  # the tower and cross layers of `reference`
        return model

    def _install_transformers_parts(self) -> None:
        """Our forwards on the instances of transformers' modules we run: the vision tower's (install_tower) and the
        cross-attention layers' attention (mllama_cross_attention.py)."""
        decoder = self.model.language_model
        install_tower(self.model.vision_model, decoder.runtime)
        install_cross_attention(decoder.layers[i] for i in decoder.borrowed_layers)

    @classmethod
    def text_family(cls, config) -> str:
        return "llama"  # the text config's model_type is mllama_text_model

    def _image_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_states,
                      tiles: torch.Tensor | None = None) -> torch.Tensor | None:
        """The projected image states (B, images * tiles * patches, C) the cross-attention layers attend to
        (transformers' MllamaModel.forward), or the given ones, or None (text only, or cached). `tiles` (B, C): only
        those tiles of each row are projected and returned (mllama_tiles.py)."""
        if pixel_values is None:
            return cross_attention_states
        if cross_attention_states is not None:
            raise ValueError("`pixel_values` and `cross_attention_states` cannot be provided simultaneously")
        if aspect_ratio_ids is None:
            raise ValueError("`aspect_ratio_ids` must be provided if `pixel_values` is provided")
        backbone = self.model
        states = backbone.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                       aspect_ratio_mask=aspect_ratio_mask, tiles=tiles  # mllama_tower.py
                                       ).last_hidden_state  # (B, I, K, P, Dv), or (B, 1, C, P, Dv) with tiles
        projected = tower_projections(backbone.language_model.runtime, states, (backbone.multi_modal_projector,))[0]
        return projected.reshape(-1, states.shape[-2], backbone.hidden_size)  # (B, images * tiles * patches, C)

    def _cross_masks(self, cross_attention_mask, T: int, cache) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cross-attention mask (B, 1, T, N) additive, full-text-row mask (B, 1, T, 1)) from the processor's
        (B, T', images, tiles) mask, or (None, None). A mask longer than the call's T tokens (a plain forward with a
        cache, or transformers 5.17's generate, which passes the whole mask) is cut to the tokens after the cached
        ones, as transformers does."""
        if cross_attention_mask is None:
            return None, None
        if cross_attention_mask.shape[1] != T:
            past = int(cache.get_seq_length()) if cache is not None else 0
            cross_attention_mask = cross_attention_mask[:, past:past + T]
        return modeling_mllama._prepare_cross_attention_mask(
            cross_attention_mask, num_vision_tokens=self.model.vision_model.num_patches, dtype=self.model.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ):
        """transformers' Mllama forward contract; other kwargs (cache_position, return_dict, ...) are ignored."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        decoder = self.model.language_model
        embeds = decoder.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        cached = self.uses_cache(use_cache)
        tiles = None  # the tiles some token attends to, when others can leave (mllama_tiles.py; not with a cache)
        if pixel_values is not None and cross_attention_mask is not None and not cached \
                and cross_attention_mask.shape[1] == embeds.shape[1]:
            tiles = used_tiles(cross_attention_mask)
        states = self._image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_states, tiles)
        if tiles is not None:
            cross_attention_mask = select_tile_mask(cross_attention_mask, tiles)  # (B, T, 1, C)
        mask, rows = self._cross_masks(cross_attention_mask, embeds.shape[1], cache if cached else None)
        borrowed = dict(cross_attention_states=states, cross_attention_mask=mask, full_text_row_masked_out_mask=rows)
        return self.run_decoder(embeds, attention_mask, position_ids, cache, use_cache, labels, num_items_in_batch,
                                shift_labels, logits_to_keep, return_logits, borrowed=borrowed)
