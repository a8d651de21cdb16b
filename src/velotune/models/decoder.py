"""One pre-norm decoder that every supported family configures (see spec.py).

`DecoderForCausalLM` is a `PreTrainedModel` + `GenerationMixin`, so `generate`, `save_pretrained`,
PEFT and TRL treat it like any transformers causal LM. It talks to generation through the
public `Cache.update` API only, and accepts the cache under both names transformers has used
(`past_key_values` up to 5.2x, `cache` after), so it does not break when that changes.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..fast import plan as fast_plan
from ..fast.checkpointing import OffloadedCheckpointer, checkpoint_function, plain_checkpoint, recomputing
from .generation import unpack_generate_inputs
from ..fast.layer_graphs import ModelGraphs, graphs_enabled
from .layers import Attention, GatedMLP, make_norm
from .loss import causal_lm_loss, fused_causal_lm_loss
from .masks import LayerMasks, mask_inputs
from .rope import RotaryEmbedding
from .saving import safetensors_only
from .spec import FAMILIES, FamilySpec, layer_types_of

# The field transformers' output record uses for the KV cache in the installed version.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: FamilySpec, layer_idx: int, sliding: bool):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, spec, layer_idx, sliding)
        self.mlp = GatedMLP(config)
        self.input_layernorm = make_norm(spec, config.hidden_size, eps)
        self.post_attention_layernorm = make_norm(spec, config.hidden_size, eps)
        self.sandwich = spec.sandwich_norm
        if spec.sandwich_norm:
            # Gemma 2/3: post_attention_layernorm normalises the attention output, and the MLP
            # gets its own pre and post norms. Elsewhere post_attention_layernorm is the MLP's pre-norm.
            self.pre_feedforward_layernorm = make_norm(spec, config.hidden_size, eps)
            self.post_feedforward_layernorm = make_norm(spec, config.hidden_size, eps)

    def forward(self, x, cos_sin, masks, cache=None, fast=False):  # x (B, T, C); fast: False or a LayerPlan
        h = self.self_attn(self.input_layernorm(x, fast), cos_sin, masks, cache, fast)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h, fast)
            h = self.mlp(self.pre_feedforward_layernorm(x, fast), fast)
            return x + self.post_feedforward_layernorm(h, fast)
        x = x + h
        # In a checkpoint's recomputation the sum below is only differentiated, so the fused MLP
        # may return an unset value and run its whole computation in backward (value_unused).
        # Not after a sandwich norm: that norm's backward reads the MLP output's value.
        h = self.mlp(self.post_attention_layernorm(x, fast), fast, value_unused=bool(fast) and recomputing())
        return x + h


class DecoderModel(fast_plan.FastPathDecoder):
    """embed_tokens -> layers -> norm, named as transformers' `*Model` so keys start with `model.`."""

    def __init__(self, config: PretrainedConfig, spec: FamilySpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.layer_types = layer_types_of(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(
            DecoderLayer(config, spec, i, kind == "sliding_attention") for i, kind in enumerate(self.layer_types)
        )
        self.norm = make_norm(spec, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = nn.ModuleDict({kind: RotaryEmbedding(config, kind) for kind in sorted(set(self.layer_types))})
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable
        self.checkpoint_mode: bool | str = False
        self._checkpoint_function = checkpoint_function(True)
        self.fast_path: bool | None = None  # None: automatic; see velotune.fast.plan.set_fast_path
        self._graphs = ModelGraphs()  # CUDA graphs of the checkpointed layers (fast/layer_graphs.py)

    def set_checkpointing(self, mode: bool | str) -> None:
        """get_peft_model's `use_gradient_checkpointing`: False, True (plain per-layer
        checkpoints) or "unsloth" (per-layer checkpoints whose inputs wait in pinned CPU memory)."""
        self.checkpoint_mode = mode
        self.gradient_checkpointing = bool(mode)
        self._checkpoint_function = checkpoint_function(mode)

    @property
    def _gradient_checkpointing_func(self):
        return self._checkpoint_function

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function) -> None:
        """transformers' toggle (which Trainer calls again when training starts with
        gradient_checkpointing=True) sets this; it must not silently undo "unsloth" offloading."""
        if isinstance(self._checkpoint_function, OffloadedCheckpointer):
            return
        self._checkpoint_function = function

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, C)
        if self.spec.scale_embeddings:
            # Gemma scales by sqrt(hidden) rounded to the weights' dtype, as its checkpoints expect.
            h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=self.embed_tokens.weight.dtype)
        return h

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        fast: "fast_plan.FastPathDecision | None" = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """transformers' `*Model.forward` contract (TRL calls the backbone directly for its fused
        loss); unused kwargs (output_attentions, cache_position, ...) are accepted and ignored.
        `fast`: the fast-path decision when the caller already made it (None: ask fast/plan.py)."""
        decision = fast_plan.decide(self) if fast is None else fast
        plans = decision.layers if decision.enabled else (False,) * len(self.layers)
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = h.shape
        past = cache.get_seq_length() if cache is not None else 0
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = self._default_positions(attention_mask, past, T, h.device)
        masks_in = mask_inputs(attention_mask, position_ids if explicit_positions else None, past, T, h.device)
        cos_sin = {kind: rope(h, position_ids) for kind, rope in self.rotary_emb.items()}
        masks = {kind: LayerMasks(masks_in, self.config.sliding_window if kind == "sliding_attention" else None)
                 for kind in cos_sin}
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # Our checkpoint functions replay no random numbers where the layers draw none: the fast
        # path has no LoRA dropout, so only attention dropout could.
        draws = not decision.enabled or getattr(self.config, "attention_dropout", 0.0) > 0
        function = self._checkpoint_function
        ours = isinstance(function, OffloadedCheckpointer) or function is plain_checkpoint
        rng = {} if draws or not ours else {"preserve_rng_state": False}
        # Graphs need masks that are no tensors (padding and packing masks are built per batch).
        graphable = any(m.tensor_free() for m in masks.values())
        graphs = self._graph_buffers(h, checkpoint and decision.enabled and not draws and cache is None and graphable)
        for index, (layer, kind, plan) in enumerate(zip(self.layers, self.layer_types, plans)):
            if checkpoint:
                run = functools.partial(layer.__call__, fast=plan)
                graphed = None
                if graphs is not None and masks[kind].tensor_free():
                    graphed = self._graphs.layer(graphs, index, layer, plan, kind, cos_sin[kind], masks[kind], h)
                extra = {} if graphed is None else {"graphed": graphed}
                h = self._gradient_checkpointing_func(run, h, cos_sin[kind], masks[kind], None, **rng, **extra)
            else:
                h = layer(h, cos_sin[kind], masks[kind], cache, plan)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h, decision.enabled), **{_CACHE_FIELD: cache})

    def _graph_buffers(self, h: torch.Tensor, eligible: bool):
        """The CUDA-graph buffers for this forward (fast/layer_graphs.py), or None when its layers run
        eagerly: `eligible` (a fast-path training forward through our checkpoint, no random
        numbers drawn, no cache) and the offloading checkpoint takes these layers."""
        function = self._checkpoint_function
        if not (eligible and isinstance(function, OffloadedCheckpointer) and graphs_enabled()):
            return None
        if not (h.is_cuda or function.offload_on_cpu) or h.shape[:-1].numel() < function.min_tokens:
            return None
        return self._graphs.begin(h)

    @staticmethod
    def _default_positions(attention_mask, past: int, T: int, device) -> torch.Tensor:
        """Position ids count real tokens only, so a left-padded prompt starts at 0 (as generate does)."""
        if attention_mask is None:
            return torch.arange(past, past + T, device=device)[None]  # (1, T)
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        return positions[:, -T:]  # (B, T)


class DecoderForCausalLM(PreTrainedModel, GenerationMixin):
    """Base of our per-family classes; `spec` is set by each subclass."""

    spec: FamilySpec = FAMILIES["llama"]
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.model = DecoderModel(config, self.spec)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif hasattr(module, "variance_epsilon"):
            nn.init.ones_(module.weight)
        elif hasattr(module, "eps") and hasattr(module, "weight"):
            nn.init.zeros_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            # transformers' from_pretrained builds on the meta device and calls this for buffers too.
            module.reset_frequencies()

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under transformers' own names and layout (families with fused checkpoints override)."""
        return dict(self.state_dict())

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate, also given a tokenizer's BatchEncoding as `inputs`/`input_ids`
        (the docs' `model.generate(input_ids=inputs, ...)` on transformers 5; see generation.py)."""
        args, kwargs = unpack_generate_inputs(args, kwargs)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, safe_serialization=True, **kwargs):
        """transformers' save_pretrained (always safetensors in 5.x); a notice when .bin was asked for."""
        safetensors_only(safe_serialization, "the model")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
    ) -> CausalLMOutputWithPast:
        """Same contract as transformers' `*ForCausalLM.forward`; extra kwargs (cache_position,
        return_dict, output_attentions=False, ...) are accepted and ignored.

        On the fast path, a training forward with labels computes the loss with the fused linear
        cross-entropy and returns `logits=None` (the (B, T, V) logits are never built), unless
        the caller asks for them: `return_logits=True`, `VELOTUNE_RETURN_LOGITS=1`, or a loaded
        TRL whose SFTTrainer reads them (see `fast.plan.logits_wanted`). Evaluation (eval mode or
        no grad), generation and calls without labels always return the logits."""
        decision = fast_plan.decide(self.model)
        fast = decision.enabled
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                         past_key_values=past_key_values, fast=decision)
        hidden = out.last_hidden_state  # (B, T, C)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        has_labels = labels is not None or shift_labels is not None
        head = _lm_head_weight(self.lm_head) if fast and has_labels and self.training else None
        if head is not None and head.dtype == hidden.dtype and torch.is_grad_enabled() \
                and not fast_plan.logits_wanted(return_logits):
            loss = fused_causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels, softcap)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T', V)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


def _lm_head_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The (V, C) output weight the fused cross-entropy can use, or None (a LoRA-wrapped or
    biased head): a plain Linear, or the active copy of PEFT's modules_to_save wrapper."""
    if type(lm_head).__name__ == "ModulesToSaveWrapper":
        active = [a for a in lm_head.active_adapters if a in lm_head.modules_to_save]
        use_copy = active and not lm_head.disable_adapters
        lm_head = lm_head.modules_to_save[active[0]] if use_copy else lm_head.original_module
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return lm_head.weight
    return None
