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

from ..fast import decode_linear
from ..fast.checkpointing import LayerCheckpointer, plain_checkpoint
from ..fast.host_embedding import host_lookup, is_on_host, to_device, to_host
from ..fast.layer_graphs import ModelGraphs
from ..fast.plan import PLAIN, FastPathDecoder, RuntimeSettings, StepPlan, layer_plan, plan_step
from .generation import unpack_generate_inputs
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
        self.mlp = GatedMLP(config, layer_idx)
        self.input_layernorm = make_norm(spec, config.hidden_size, eps)
        self.post_attention_layernorm = make_norm(spec, config.hidden_size, eps)
        self.sandwich = spec.sandwich_norm
        if spec.sandwich_norm:
            # Gemma 2/3: post_attention_layernorm normalises the attention output, and the MLP
            # gets its own pre and post norms. Elsewhere post_attention_layernorm is the MLP's pre-norm.
            self.pre_feedforward_layernorm = make_norm(spec, config.hidden_size, eps)
            self.post_feedforward_layernorm = make_norm(spec, config.hidden_size, eps)

    def forward(self, x, cos_sin, masks, cache=None, plan: StepPlan = PLAIN):  # x (B, T, C)
        if plan.fast and plan.per_layer:  # sharded weights: FSDP2's hook gathered them just now
            plan = plan.with_layer(self.self_attn.layer_idx, layer_plan(self))
        if plan.fast and plan.gemv_rows and not self.sandwich and decode_linear.fuses_norm(x, plan.gemv_rows):
            # A decode step: the q/k/v and gate/up GEMVs apply the pre-norms as they read x, the o
            # and down GEMVs add the residual stream in their epilogues.
            x = self.self_attn(x, cos_sin, masks, cache, plan, prenorm=self.input_layernorm, residual=x)
            return self.mlp(x, plan, prenorm=self.post_attention_layernorm, residual=x)
        h = self.self_attn(self.input_layernorm(x, plan), cos_sin, masks, cache, plan)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h, plan)
            h = self.mlp(self.pre_feedforward_layernorm(x, plan), plan)
            return x + self.post_feedforward_layernorm(h, plan)
        x = x + h
        # In a checkpoint's recomputation the sum below is only differentiated, so the fused MLP
        # may return an unset value and run its whole computation in backward (value_unused).
        # Not after a sandwich norm: that norm's backward reads the MLP output's value.
        h = self.mlp(self.post_attention_layernorm(x, plan), plan, value_unused=plan.fast and plan.recompute)
        return x + h


class DecoderModel(FastPathDecoder):
    """embed_tokens -> layers -> norm, named as transformers' `*Model` so keys start with `model.`.

    Holds architecture and weights; the user's runtime choices are one record, `runtime`
    (fast/plan.py's RuntimeSettings), which each call's plan reads. Besides that it keeps two
    runtime caches: the offloading checkpoint's link between layers and the layers' CUDA graphs."""

    def __init__(self, config: PretrainedConfig, spec: FamilySpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.layer_types = layer_types_of(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(self.make_layer(i, kind) for i, kind in enumerate(self.layer_types))
        # Layers of transformers' own classes among ours (Mllama's cross-attention layers): see `borrowed_call`
        self.borrowed_layers = frozenset(i for i, m in enumerate(self.layers) if not isinstance(m, DecoderLayer))
        self.norm = make_norm(spec, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = nn.ModuleDict({kind: RotaryEmbedding(config, kind) for kind in sorted(set(self.layer_types))})
        self.runtime = RuntimeSettings()
        self._plain_checkpoint = plain_checkpoint  # transformers' toggle may install its own
        self._checkpointer = LayerCheckpointer()
        self._graphs = ModelGraphs()  # CUDA graphs of the checkpointed layers (fast/layer_graphs.py)

    # transformers' checkpointing toggle (gradient_checkpointing_enable / disable, which Trainer
    # calls again when training starts with gradient_checkpointing=True) sets these two
    # attributes on every module that has them; they map onto `runtime`, and never undo "unsloth".
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.runtime.checkpointing)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        if not enable:
            self.runtime.checkpointing = False
        elif not self.runtime.checkpointing:
            self.runtime.checkpointing = True

    @property
    def _gradient_checkpointing_func(self):
        """What transformers' code reads as the layer checkpoint; the fast path's plan decides itself (plan.py)."""
        return self._checkpointer if self.runtime.checkpointing == "unsloth" else self._plain_checkpoint

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function) -> None:
        self._plain_checkpoint = function

    def set_checkpointing(self, mode: bool | str) -> None:
        """get_peft_model's `use_gradient_checkpointing`: False, True (per-layer checkpoints whose
        inputs stay on the device) or "unsloth" (whose inputs wait in pinned CPU memory). On the fast
        path both run fast/checkpointing.py's function; elsewhere True is torch's checkpoint, or the
        function transformers' toggle installs (`_gradient_checkpointing_func`)."""
        self.runtime.checkpointing = mode
        self._plain_checkpoint = plain_checkpoint

    def make_layer(self, index: int, kind: str) -> nn.Module:
        """Layer `index` of kind `kind` ("full_attention" / "sliding_attention"): ours. A decoder whose family
        interleaves layers of another kind (Mllama's cross-attention into the image) returns transformers' own
        module for those (a "borrowed" layer, run through `borrowed_call`)."""
        return DecoderLayer(self.config, self.spec, index, kind == "sliding_attention")

    def borrowed_call(self, index: int, layer: nn.Module, cache, inputs: dict):
        """How borrowed layer `index` runs in this call: a function of the hidden states (B, T, C) -> (B, T, C), or
        None to skip the layer. `inputs`: the forward's `borrowed` keyword arguments (the family's own, e.g. the
        cross-attention states and masks). Decoders that make borrowed layers define it (models/mllama.py)."""
        raise NotImplementedError(f"{type(self).__name__} holds borrowed layer {index} ({type(layer).__name__}) "
                                  "but does not define borrowed_call")

    def _run_borrowed(self, index: int, layer: nn.Module, h: torch.Tensor, cache, plan: StepPlan,
                      inputs: dict) -> torch.Tensor:
        """A borrowed layer in the layer loop. The fast path's fused projections, its layer checkpointer and the
        CUDA graphs are ours only, so this layer runs its own modules (PEFT's LoRA layers inside included). Where
        the plan checkpoints, torch's non-reentrant checkpoint (its inputs come as keyword arguments, which a
        reentrant one would cut from the graph), unless transformers' toggle made the layer checkpoint itself
        (a GradientCheckpointingLayer with its flag on): checkpointing it twice would recompute it twice."""
        run = self.borrowed_call(index, layer, cache, inputs)
        if run is None:
            return h
        if plan.checkpoint == "off" or getattr(layer, "gradient_checkpointing", False):
            return run(h)
        return plain_checkpoint(run, h)

    def get_input_embeddings(self) -> nn.Embedding:
        """As transformers' text models (a composite model such as Qwen2-VL asks its language model)."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) on the layers' device, from a table there or in host memory (host_embedding.py:
        a training plan put it there; one that trains goes back first)."""
        device = self.compute_device
        if is_on_host(self.embed_tokens, device) and self.embed_tokens.weight.requires_grad:
            to_device(self.embed_tokens, device)
        if is_on_host(self.embed_tokens, device):
            h = host_lookup(self.embed_tokens.weight, input_ids, device)  # (B, T, C)
        else:
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
        plan: StepPlan | None = None,
        borrowed: dict | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """transformers' `*Model.forward` contract (TRL calls the backbone directly for its fused
        loss); unused kwargs (output_attentions, cache_position, ...) are accepted and ignored.
        `plan`: the call's plan when the caller made it (DecoderForCausalLM), else made here.
        `borrowed`: keyword arguments for the borrowed layers (`borrowed_call`)."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if plan is not None and plan.host_embedding and self.embed_tokens.weight.device.type != "cpu":
            to_host(self.embed_tokens)  # this and later calls read it there (a composite model embedded already)
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = h.shape
        if plan is None:
            plan = plan_step(self, training=self.training, grad=torch.is_grad_enabled(), tokens=B * T,
                             cache=cache is not None)
        past = cache.get_seq_length() if cache is not None else 0
        mask_positions = position_ids  # explicit ids that restart mark packed sequences
        if position_ids is not None and position_ids.dim() == 3:
            # Multimodal RoPE: (3, B, T) ids, or (4, B, T) with the text ids first (transformers' generate
            # for Qwen2-VL). Only text ids can mark packing: the image axes repeat by design.
            mask_positions = position_ids[0] if position_ids.shape[0] == 4 else None
            position_ids = position_ids[-3:]
        if position_ids is None:
            position_ids = self._default_positions(attention_mask, past, T, h.device)
        masks_in = mask_inputs(attention_mask, mask_positions, past, T, h.device)
        cos_sin = {kind: rope(h, position_ids) for kind, rope in self.rotary_emb.items()}
        masks = {kind: LayerMasks(masks_in, self.config.sliding_window if kind == "sliding_attention" else None)
                 for kind in cos_sin}
        # torch's checkpoint where the launch check asked for it, else the function transformers' toggle installed
        plain = plain_checkpoint if self.runtime.torch_checkpoint else self._plain_checkpoint
        ours = plan.checkpoint != "plain" or plain is plain_checkpoint
        rng = {} if plan.replay_rng or not ours else {"preserve_rng_state": False}
        graphs = None
        if plan.graphs and all(m.graphable() for m in masks.values()):
            graphs = self._graphs.begin(h)
        for index, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            if index in self.borrowed_layers:
                h = self._run_borrowed(index, layer, h, cache, plan, borrowed or {})
                continue
            if plan.checkpoint == "off":
                h = layer(h, cos_sin[kind], masks[kind], cache, plan)
                continue
            run = functools.partial(layer.__call__, plan=plan)
            if plan.checkpoint == "plain":
                h = plain(run, h, cos_sin[kind], masks[kind], None, **rng)
                continue
            graphed = None
            if graphs is not None:
                graphed = self._graphs.layer(graphs, index, layer, plan, kind, cos_sin[kind], masks[kind], h)
            recompute = functools.partial(layer.__call__, plan=plan.for_recomputation())
            h = self._checkpointer(run, h, cos_sin[kind], masks[kind], None, recompute=recompute, graphed=graphed,
                                   offload=plan.checkpoint == "offload", **rng)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h, plan), **{_CACHE_FIELD: cache})

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
        (the docs' `model.generate(input_ids=inputs, ...)` on transformers 5; see generation.py).
        After `FastLanguageModel.for_inference` the generation engine runs it."""
        args, kwargs = unpack_generate_inputs(args, kwargs)
        engine = getattr(self, "generation_engine", None)
        if engine is not None:
            return engine.generate(self, super().generate, *args, **kwargs)
        return super().generate(*args, **kwargs)

    # Generation as the docs' GRPO notebooks call it (vLLM's API), on the engine from_pretrained
    # attaches as `generation_engine` (velotune.inference sits above this package: no import).
    def fast_generate(self, *args, **kwargs):
        return self._engine().fast_generate(self, *args, **kwargs)

    def save_lora(self, save_directory) -> None:
        self._engine().save_lora(self, save_directory)

    def load_lora(self, save_directory, load_tensors: bool = True):
        return self._engine().load_lora(self, save_directory)

    def _engine(self):
        engine = getattr(self, "generation_engine", None)
        if engine is None:
            raise AttributeError("fast_generate, save_lora and load_lora need the model FastLanguageModel."
                                 "from_pretrained returned (it attaches velotune's generation engine)")
        return engine

    def save_pretrained(self, save_directory, *args, safe_serialization=True, **kwargs):
        """transformers' save_pretrained (always safetensors in 5.x); a notice when .bin was asked for."""
        safetensors_only(safe_serialization, "the model")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the layers run (transformers' property reads the first parameter: the input embedding, which may
        wait in host memory while training, host_embedding.py)."""
        return self.model.compute_device

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
        the caller asks for them: `return_logits=True` or `VELOTUNE_RETURN_LOGITS=1` (the plan's
        `fused_loss`). Evaluation (eval mode or no grad), generation and calls without labels
        always return the logits."""
        has_labels = labels is not None or shift_labels is not None
        tokens = (input_ids if input_ids is not None else inputs_embeds[..., 0]).numel()
        cached = bool(use_cache if use_cache is not None else self.config.use_cache and not self.training)
        plan = plan_step(self.model, training=self.training, grad=torch.is_grad_enabled(), labels=has_labels,
                         return_logits=return_logits, tokens=tokens, cache=cached, lm_head=self.lm_head)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                         past_key_values=past_key_values, plan=plan)
        loss, logits = head_outputs(self.lm_head, out.last_hidden_state, plan, labels, num_items_in_batch,
                                    shift_labels, logits_to_keep, getattr(self.config, "final_logit_softcapping", None))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


def head_outputs(lm_head: nn.Module, hidden: torch.Tensor, plan: StepPlan, labels=None, num_items_in_batch=None,
                 shift_labels=None, logits_to_keep: int | torch.Tensor = 0, softcap: float | None = None):
    """(loss, logits) from the final norm's output `hidden` (B, T, C): the fused linear cross-entropy when the
    plan says so and the head allows it (logits None then, never built), else lm_head, soft-capping and the loss
    (None without labels). Shared by every model that ends in our decoder (causal LMs, Qwen2-VL)."""
    head = _lm_head_weight(lm_head) if plan.fused_loss else None
    if head is not None and head.dtype == hidden.dtype:
        return fused_causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels, softcap), None
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = lm_head(hidden[:, keep, :])  # (B, T', V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = None
    if labels is not None or shift_labels is not None:
        loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
    return loss, logits


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
