"""The shared part of our vision-language classes: transformers' vision tower and projector, our decoder as
the language model (see qwen_vl.py, llava.py and mllama.py for the families).

A family's class subclasses transformers' own under the same name and keeps its module tree (`model.<tower>`,
`model.<projector>`, `model.language_model`, `lm_head`), with our `DecoderModel` at `model.language_model`, so
saved folders load in transformers, PEFT adapters and the vision layer groups (vision/families.py) are
unchanged. Loading is transformers' (its checkpoint renames apply only to its own classes), then `adopt` moves
the loaded text model's weights into our decoder: every tensor is shared, nothing is copied. `forward` is the
family's: its image features placed into the embeddings, its positions, then `run_decoder` (our decoder under
the step plan, our head and fused loss).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
# CausalLMOutputWithPast, not MultimodalCausalLMOutputWithPast: the latter is new in transformers 5.2x (absent in
# the GPU machine's 5.17), and our decoder returns no image fields anyway.
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..fast.plan import plan_step
from .decoder import DecoderModel, head_outputs
from .spec import FAMILIES

_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                else "past_key_values")


class OwnTextDecoder:
    """Mixed into a family's class (before transformers' class): our decoder as its language model."""

    _transformers_class: type  # the transformers class the family subclasses
    _decoder_class: type = DecoderModel  # our language model (Mllama's holds transformers' cross-attention layers)

    @classmethod
    def text_family(cls, config) -> str:
        """The FamilySpec name of the language model (the text config's model_type)."""
        return config.get_text_config().model_type

    def _install_decoder(self) -> None:
        # transformers' __init__ built its text model; ours takes its place under the same name.
        text = self.config.get_text_config()
        self.model.language_model = self._decoder_class(text, FAMILIES[self.text_family(self.config)])

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

    def generate(self, *args, **kwargs):
        """transformers' generate; after `FastVisionModel.for_inference` velotune's engine runs it (the prefill
        through the family's `prefill_inputs`, the decode steps on our decoder's fast path)."""
        engine = getattr(self, "generation_engine", None)
        if engine is not None:
            return engine.generate(self, super().generate, *args, **kwargs)
        return super().generate(*args, **kwargs)

    def run_decoder(self, embeds, attention_mask, positions, cache, use_cache, labels, num_items_in_batch,
                    shift_labels, logits_to_keep, return_logits,
                    borrowed: dict | None = None) -> CausalLMOutputWithPast:
        """Our decoder over the input embeddings (B, T, C) at `positions`, under the step plan, then our head and
        loss. Training with labels on the fast path returns `logits=None` unless `return_logits=True` (as our
        causal LMs do). `borrowed`: the decoder's keyword arguments for its borrowed layers (Mllama)."""
        decoder = self.model.language_model
        has_labels = labels is not None or shift_labels is not None
        plan = plan_step(decoder, training=self.training, grad=torch.is_grad_enabled(), labels=has_labels,
                         return_logits=return_logits, tokens=embeds.shape[0] * embeds.shape[1],
                         cache=self.uses_cache(use_cache), lm_head=self.lm_head)
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, cache=cache,
                      use_cache=use_cache, plan=plan, borrowed=borrowed)
        loss, logits = head_outputs(self.lm_head, out.last_hidden_state, plan, labels, num_items_in_batch,
                                    shift_labels, logits_to_keep)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD, None)})

    def uses_cache(self, use_cache: bool | None) -> bool:
        """Whether this call reads/writes a KV cache (as our decoder decides it)."""
        text = self.model.language_model.config
        return bool(use_cache if use_cache is not None else text.use_cache and not self.training)


def adopt_modules(ours: nn.Module, theirs: nn.Module) -> None:
    """Move the weights of transformers' text model `theirs` into our decoder `ours` (same dotted names):
    each leaf module that holds weights (Linear, bitsandbytes' Linear4bit, Embedding) is taken whole, each
    norm's weight Parameter is taken into our norm (our norm classes compute the family's formula). A borrowed
    layer (transformers' own class among ours, DecoderModel.make_layer) is taken whole, with the parameters it
    holds itself (Mllama's cross-attention gates). A name transformers has and we lack, or the reverse, is an
    error naming it."""
    for index in sorted(getattr(ours, "borrowed_layers", ())):
        ours.layers[index] = theirs.layers[index]
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
