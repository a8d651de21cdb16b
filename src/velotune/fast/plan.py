"""The one place that decides how a model call runs: the runtime plan of one step.

`plan_step` builds an immutable `StepPlan` from three things and nothing else: the model's
runtime settings (`RuntimeSettings`: what the user chose through `set_fast_path` and
get_peft_model's `use_gradient_checkpointing`), the model itself (which layers can fuse), and the
caller's explicit hints (training or not, labels or not, logits wanted or not, tokens per
micro-batch, a KV cache or not). The decoder passes the plan down to every layer; nothing below
it decides again, and no module keeps a flag of its own. Inference builds its plans here too.

The fast path (fused LoRA autograd functions in lora_linear.py / lora_mlp.py, the kernels for
RMSNorm, RoPE and the gated activations, the fused linear cross-entropy) turns on when all hold:

  * `VELOTUNE_DISABLE_KERNELS` is not set to 1 and the model's `fast_path` setting is not False;
  * the model is one of our own decoders (the generic transformers path never is);
  * its weights are on CUDA (or the setting is True, which tests use to run it on the CPU);
  * every projection of every layer is a Linear / bitsandbytes Linear4bit or a PEFT LoRA layer
    over one with one active adapter, lora_dropout 0, no bias training and no LoRA variant (DoRA);
  * the MLP activation has a gated kernel (SwiGLU, GeGLU tanh/exact).

Anything else keeps the module-by-module code exactly. The fast/plain decision and its reason
are logged once per distinct reason. An enabled plan carries each layer's projections in the form
the fused functions take (`LayerPlan`), resolved while checking them, so the layers do not
inspect their PEFT modules again on every call (measurable on a small model's host-bound step).
A plan is made per model call, so adapter switches, merges and `disable_adapter()` between calls
are seen.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .. import settings as env
from ..kernels import set_fast_launch
from .checkpointing import OFFLOAD_MIN_TOKENS
from .host_embedding import offloadable

logger = logging.getLogger("velotune")

# The switches this module reads (settings.py parses them; tests set them by these names).
DISABLE_ENV = "VELOTUNE_DISABLE_KERNELS"
RETURN_LOGITS_ENV = "VELOTUNE_RETURN_LOGITS"
GRAPHS_ENV = "VELOTUNE_CUDA_GRAPHS"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CHECKPOINT_MODES = ("off", "plain", "keep", "offload")
# CUDA graphs where a layer's launches outlast its GPU work: up to this many elements in a layer
# input (tokens per micro-batch x hidden size). Measured (BENCHMARKS.md): a Llama-3.2-1B layer at
# 4,096 tokens (2048 hidden, 8.4M) took about 7 ms of host time for 4.7 ms of GPU work, and graphs
# doubled the step's tokens/s; a Llama-3.1-8B layer at 4,096 tokens (4096 hidden) is bound by the
# GPU, where graphs gained nothing and their pool cost 1.1 GiB.
MAX_GRAPHED_ELEMENTS = 2048 * 4096
# With FP8 base GEMMs the GPU work shrinks and the layer's launches grow (the quantization kernels): the 8B layer at
# 4,096 tokens was host-bound, 7,238 tokens/s eager against 14,160 graphed (BENCHMARKS.md, sessions 18-19), its pool
# ~1 GiB, offset by the input embedding waiting in host memory (host_embedding.py). Plans with FP8 graph up to this.
MAX_GRAPHED_ELEMENTS_FP8 = 4096 * 4096
# Decode: calls with a KV cache and no autograd run projections of up to this many token rows
# through the small-batch GEMV kernels and the fused decode attention (decode_linear.py). One row:
# there they beat cuBLAS (BENCHMARKS.md, 217 vs 167 tokens/s at 8B). At 8 rows (a GRPO group) cuBLAS
# per projection was 2.2-3.6x faster than the GEMVs and SDPA 1.7x faster than the fused attention
# (H200, bench_gemv --rows 8), and the GEMVs took 70% of an 8B GRPO step's generation. The kernels take
# up to kernels.gemv.MAX_ROWS rows (tests run them so). Module-level so tests and benches can set it.
GEMV_ROWS = 1
_logged: set[str] = set()


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer's fused projections (lora_linear.py `LoraProjection`s), by group."""

    qkv: tuple  # q, k, v
    o: tuple  # (o,)
    mlp: tuple  # gate, up, down
    # Generation only: the groups' adapters stacked in persistent 16-bit buffers (stacked_adapters.py
    # LayerAdapters), read by no-grad calls instead of a cat + cast per call; None: stack per call.
    adapters: object = None


@dataclass
class RuntimeSettings:
    """A model's runtime choices, as the user (and the trainer's launch check) made them; `plan_step` reads them.

    `fast_path`: True (fast path wherever the LoRA settings allow, even off CUDA), False (always
    the plain path), None (automatic). `checkpointing`: get_peft_model's
    `use_gradient_checkpointing` (False, True, or "unsloth": offload each layer's input to pinned
    host memory, from `offload_min_tokens` tokens per micro-batch). `offload_on_cpu`: run the
    offloading checkpoint on CPU tensors too (a host clone stands in for the pinned copy), how tests
    exercise it without a GPU."""

    fast_path: bool | None = None
    checkpointing: bool | str = False
    offload_min_tokens: int = OFFLOAD_MIN_TOKENS
    offload_on_cpu: bool = False
    fp8_compute: bool = False  # base projection GEMMs in FP8 where possible (load_in_fp8 / fp8_compute)
    # Whether layers checkpoint through torch's non-reentrant checkpoint even on the fast path: a DDP wrapper with
    # find_unused_parameters=True fails on fast/checkpointing.py's reentrant-style function (a weight marked ready
    # twice). training/distributed.check_launch sets it from the trainer's DDP settings (True / False); None (not
    # checked, e.g. a trainer that does not run that check): torch's checkpoint whenever a process group is active.
    torch_checkpoint: bool | None = None
    # Training calls may keep a frozen, untied input embedding in pinned host memory (host_embedding.py); the
    # generation engine sets False: its decode graphs read the table on the device.
    host_embedding: bool = True


@dataclass(frozen=True)
class StepPlan:
    """How one model call runs. Built by `plan_step`; never changed (a recomputation uses a copy).

    fast: fused LoRA functions and kernels (`layers` holds each layer's fused projections).
    fused_loss: the causal-LM loss through the fused linear cross-entropy; logits are not built.
    checkpoint: "off", "plain" (torch's checkpoint per layer), "keep" or "offload" (fast/checkpointing.py's
      function, the layer input kept on the device or copied to pinned host memory).
    replay_rng: checkpoint recomputations replay the random state (a layer draws random numbers).
    graphs: checkpointed layers may replay CUDA graphs (fast/layer_graphs.py; each layer still
      needs a mask without tensors).
    recompute: this call re-runs a checkpointed layer for its backward; the layer's output value
      is then dead (only its autograd graph is used), so the fused MLP may skip its forward matmul.
    gemv_rows: projections of up to this many token rows run through the decode GEMV kernels
      (decode_linear.py; calls with a KV cache and without autograd on the fast path), 0: never.
    per_layer: the weights are sharded (FSDP2's `fully_shard`): each layer's projections are
      resolved at that layer's call (`layer_plan`), after FSDP2's pre-forward hook has gathered
      them, and `layers` starts empty. It must: FSDP2 hands every tensor it finds in a layer's
      call arguments (dataclasses included) to its post-backward hook, and sharded adapters there
      get plain-tensor gradients ("got mixed torch.Tensor and DTensor").
    host_embedding: the decoder moves its frozen input embedding into pinned host memory before this call
      (host_embedding.py says when and why); the lookup reads it there.
    """

    fast: bool = False
    reason: str = "plain path"
    warn: bool = False  # a CUDA model lost the fast path to its own settings (dropout, bias, DoRA)
    layers: tuple[LayerPlan | None, ...] = ()  # None for a borrowed layer (FastPathDecoder)
    fused_loss: bool = False
    checkpoint: str = "off"
    replay_rng: bool = True
    graphs: bool = False
    recompute: bool = False
    per_layer: bool = False
    gemv_rows: int = 0
    fp8: bool = False  # some projections' base GEMMs run in FP8 (their LoraProjection.fp8 is set)
    fp8_reason: str = ""  # where FP8 runs and why not elsewhere; empty when it was not asked for
    host_embedding: bool = False

    def layer(self, index: int) -> LayerPlan | None:
        return self.layers[index] if self.fast else None

    def for_recomputation(self) -> "StepPlan":
        return dataclasses.replace(self, recompute=True)

    def with_layer(self, index: int, layer: LayerPlan) -> "StepPlan":
        layers = list(self.layers) + [None] * (index + 1 - len(self.layers))  # a per_layer plan starts empty
        layers[index] = layer
        return dataclasses.replace(self, layers=tuple(layers))


PLAIN = StepPlan()  # what a module called on its own (outside a decoder call) runs


class FastPathDecoder(nn.Module):
    """Base of the decoders the fast path can run (velotune.models.decoder.DecoderModel).

    Declared here and subclassed there, so the plan recognises our decoder without importing the
    models package, which sits above this one (tests/test_layering.py). A subclass has
    `embed_tokens`, `layers` (each with `mlp.activation` and the PROJECTIONS), `config` and
    `runtime` (its RuntimeSettings) and `norm`. `borrowed_layers`: the indices of layers that are transformers' own
    modules (Mllama's cross-attention layers): they run their own modules, so the plan, the layer
    checkpointer and the CUDA graphs leave them out (their `layers` entry is None)."""

    runtime: RuntimeSettings
    borrowed_layers: frozenset[int] = frozenset()

    @property
    def compute_device(self):
        """Where the layers run: the final norm's device, not the input embedding's, which may wait in host memory
        while training (host_embedding.py)."""
        return self.norm.weight.device


def find_decoder(model: nn.Module):
    """Our decoder (a `FastPathDecoder`) inside `model` (a PEFT wrapper, a causal LM or the backbone), or None."""
    if isinstance(model, FastPathDecoder):
        return model
    return next((m for m in model.modules() if isinstance(m, FastPathDecoder)), None)


def runtime_settings(model: nn.Module) -> RuntimeSettings:
    """The RuntimeSettings of the velotune decoder inside `model` (an error for other models)."""
    decoder = find_decoder(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} holds no velotune decoder; the fast path exists for the "
                         "families velotune implements itself (llama, mistral, qwen2/3, gemma/2/3, phi3)")
    return decoder.runtime


def set_fast_path(model: nn.Module, enabled: bool | None) -> None:
    """True: fast path wherever the LoRA settings allow, even off CUDA (tests, debugging);
    False: always the plain path; None (default): decide automatically."""
    if enabled not in (True, False, None):
        raise ValueError(f"fast_path={enabled!r}: allowed values are True, False and None (automatic)")
    runtime_settings(model).fast_path = enabled


def plan_step(model: nn.Module, *, training: bool = False, grad: bool = False, labels: bool = False,
              return_logits: bool | None = None, tokens: int = 0, cache: bool = False, device=None,
              fast_path: bool | None = None, checkpointing: bool | str | None = None,
              lm_head: nn.Module | None = None) -> StepPlan:
    """The plan of one call of `model` (any wrapper of our decoder).

    Caller hints: `training` (module in training mode), `grad` (autograd on), `labels` (a loss is
    computed), `return_logits` (the caller reads the logits even with a loss; None: only if
    VELOTUNE_RETURN_LOGITS=1), `tokens` (per micro-batch), `cache` (a KV cache is read/written).
    `device` (default: where the weights are), `fast_path` and `checkpointing` override the
    model's settings, which is how the memory estimate plans a run before the model is on the GPU.
    `lm_head`: the caller's output head, to tell whether the input embedding may wait in host memory (a tied head
    shares its weight; host_embedding.py).
    """
    decoder = find_decoder(model)
    settings = decoder.runtime if decoder is not None else RuntimeSettings()
    setting = settings.fast_path if fast_path is None else fast_path
    fast = _fast_plan(model, decoder, setting, device)
    log_once(f"velotune: {'fast' if fast.fast else 'plain'} path: {fast.reason}",
             logging.WARNING if fast.warn else logging.INFO)
    if decoder is not None and settings.fp8_compute:
        fast = _with_fp8(fast, _device(decoder, device), forced=setting is True)
    if decoder is None:
        return fast
    mode = settings.checkpointing if checkpointing is None else checkpointing
    checkpoint = "off"
    if mode and training and grad and not cache:
        on_device = _device(decoder, device).type == "cuda" or settings.offload_on_cpu
        offload = mode == "unsloth" and on_device and tokens >= settings.offload_min_tokens
        own = fast.fast and not uses_torch_checkpoint(settings)  # the recomputation-aware function (checkpointing.py)
        checkpoint = "offload" if offload else "keep" if own else "plain"
    # Layers draw random numbers only through dropout: the fast path has no LoRA dropout, so only
    # attention dropout could; without it no recomputation needs the random state replayed.
    draws = not fast.fast or getattr(decoder.config, "attention_dropout", 0.0) > 0
    switches = env.current()
    set_fast_launch(switches.triton_fast_launch)  # kernels/ reads no velotune module: each plan tells it
    asked = switches.return_logits if return_logits is None else bool(return_logits)
    graphs = (checkpoint in ("keep", "offload") and fast.fast and not draws and switches.cuda_graphs
              and not fast.per_layer and tokens * decoder.config.hidden_size <= graphed_elements(fast))
    host = (training and grad and not cache and settings.host_embedding and switches.host_embedding
            and _device(decoder, device).type == "cuda" and _embedding_to_host(decoder, lm_head))
    return dataclasses.replace(fast, fused_loss=fast.fast and training and grad and labels and not asked,
                               checkpoint=checkpoint, replay_rng=draws, graphs=graphs,
                               gemv_rows=GEMV_ROWS if fast.fast and cache and not grad else 0, host_embedding=host)


def _embedding_to_host(decoder, lm_head: nn.Module | None) -> bool:
    """Whether the input embedding may wait in host memory in this call (host_embedding.py); the reason it may not
    is logged once."""
    embedding = decoder.embed_tokens
    if embedding.weight.device.type == "cpu" and not embedding.weight.requires_grad:
        return True  # moved there by an earlier call, with what was checked then
    why = offloadable(embedding, lm_head)
    log_once("velotune: input embedding " + ("in pinned host memory while training" if why is None else
                                              f"stays on the GPU: {why}"))
    return why is None


def graphed_elements(plan: StepPlan) -> int:
    """The largest layer input (tokens x hidden) whose checkpointed layers replay CUDA graphs under `plan`."""
    return MAX_GRAPHED_ELEMENTS_FP8 if plan.fp8 else MAX_GRAPHED_ELEMENTS


def uses_torch_checkpoint(settings: RuntimeSettings) -> bool:
    """RuntimeSettings.torch_checkpoint, with None resolved: torch's checkpoint under an active process group."""
    if settings.torch_checkpoint is not None:
        return settings.torch_checkpoint
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _with_fp8(plan: StepPlan, where, forced: bool) -> StepPlan:
    """`plan` with FP8 base GEMMs marked on the projections that can take them (fast/fp8_matmul.py).

    FP8 needs the fast path (the fused functions run the GEMMs), a GPU with FP8 tensor cores (or the
    CPU under `fast_path=True`, where tests run the same path with the GEMMs in fp32), sharded weights off (FSDP2
    resolves projections inside each layer) and both dimensions of a projection multiples of 16.
    lm_head and the embeddings stay 16-bit. `VELOTUNE_REQUIRE_FP8=1` turns a model-wide refusal
    into an error; otherwise it is logged once and the 16-bit path runs.
    """
    from ..quant.fp8 import fp8_unavailable
    from .fp8_matmul import fp8_shape_reason

    why = None
    if not plan.fast:
        why = f"FP8 GEMMs run on the fast path, which is off ({plan.reason})"
    elif plan.per_layer:
        why = "the weights are sharded (FSDP2); FP8 GEMMs are not wired into per-layer plans"
    elif not (forced and where.type == "cpu"):
        why = fp8_unavailable(where)
    if why is not None:
        if env.current().require_fp8:
            raise RuntimeError(f"VELOTUNE_REQUIRE_FP8=1 but FP8 compute cannot run: {why}. Unset "
                               "VELOTUNE_REQUIRE_FP8 to fall back to 16-bit GEMMs, or run on a GPU with FP8 "
                               "(compute capability 8.9+)")
        return _log_fp8(dataclasses.replace(plan, fp8_reason=f"FP8 compute was asked for but {why}; the base "
                                            "matmuls run in 16-bit"))
    layers, skipped, total = [], [], 0
    for i, layer in enumerate(plan.layers):
        if layer is None:  # a borrowed layer: transformers' modules, no fused projections
            layers.append(None)
            continue
        groups = {}
        for group in ("qkv", "o", "mlp"):
            marked = []
            for name, p in zip(_group_names(group), getattr(layer, group)):
                total += 1
                reason = fp8_shape_reason(p)
                if reason is not None:
                    skipped.append(f"model.layers.{i}.{name}: {reason}")
                marked.append(p if reason is not None else dataclasses.replace(p, fp8=True))
            groups[group] = tuple(marked)
        layers.append(LayerPlan(**groups))
    done = total - len(skipped)
    text = (f"FP8 (e4m3, row-wise scales) base GEMMs on {done} of {total} projections; lm_head, embeddings, "
            "LoRA adapters, norms, attention and the loss stay 16/32-bit")
    if skipped:
        text += f"; 16-bit for {len(skipped)}: " + "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    return _log_fp8(dataclasses.replace(plan, layers=tuple(layers), fp8=done > 0, fp8_reason=text))


def _group_names(group: str) -> tuple[str, ...]:
    return {"qkv": PROJECTIONS[:3], "o": PROJECTIONS[3:4], "mlp": PROJECTIONS[4:]}[group]


def _log_fp8(plan: StepPlan) -> StepPlan:
    log_once(f"velotune: {plan.fp8_reason}", logging.INFO if plan.fp8 else logging.WARNING)
    return plan


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log `message` the first time it comes (a plan is made for every model call; the engine for every generate)."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def set_fp8_compute(model: nn.Module, enabled: bool) -> None:
    """True: the base projection GEMMs run in FP8 wherever the plan allows (logged where not);
    False: 16-bit GEMMs (FP8-stored weights are then dequantized to 16-bit)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"fp8_compute={enabled!r}: pass True or False")
    runtime_settings(model).fp8_compute = enabled


def _device(decoder, device):
    import torch

    return torch.device(device) if device is not None else decoder.compute_device


def _fast_plan(model: nn.Module, decoder, setting: bool | None, device) -> StepPlan:
    """The fast/plain part of the plan: whether the layers fuse, and their fused projections."""
    if env.current().disable_kernels:
        return StepPlan(reason=f"{DISABLE_ENV}=1 forces the plain path")
    if decoder is None:
        return StepPlan(reason=f"{type(model).__name__} is not a velotune decoder (generic transformers path)")
    if setting is False:
        return StepPlan(reason="fast_path=False forces the plain path")
    where = _device(decoder, device)
    if where.type != "cuda" and setting is not True:
        return StepPlan(reason=f"the model is on {where.type}, the fast path runs on CUDA")
    from .lora_mlp import GATED_ACTIVATIONS

    warn = where.type == "cuda"
    plans = []
    for i, layer in enumerate(decoder.layers):
        if i in decoder.borrowed_layers:
            plans.append(None)
            continue
        if layer.mlp.activation not in GATED_ACTIVATIONS:
            return StepPlan(reason=f"activation {layer.mlp.activation!r} has no gated kernel "
                                   f"(fused: {', '.join(GATED_ACTIVATIONS)})", warn=warn)
        reason, plan = _inspect_layer(layer)
        if reason is not None:
            return StepPlan(reason=f"model.layers.{i}.{reason}", warn=warn)
        plans.append(plan)
    where_text = "CUDA" if where.type == "cuda" else f"{where.type}, forced by fast_path=True"
    sharded = is_sharded(decoder.layers[0]) if len(decoder.layers) else False
    return StepPlan(fast=True, reason=f"{decoder.config.model_type} on {where_text}; fused LoRA and kernels"
                    + ("; projections resolved per layer (sharded weights)" if sharded else ""),
                    layers=() if sharded else tuple(plans), per_layer=sharded)


def _inspect_layer(layer: nn.Module) -> tuple[str | None, LayerPlan | None]:
    """(None, the layer's fused projections), or ("<projection>: <why not>", None)."""
    from .lora_linear import inspect_projection

    views = []
    for name in PROJECTIONS:
        reason, view = inspect_projection(layer.get_submodule(name))
        if reason is not None:
            return f"{name}: {reason}", None
        views.append(view)
    return None, LayerPlan(qkv=tuple(views[:3]), o=(views[3],), mlp=tuple(views[4:]))


def layer_plan(layer: nn.Module) -> LayerPlan:
    """A decoder layer's fused projections as they are now: under a `per_layer` plan the layer
    calls this inside its own forward, where FSDP2 has gathered its weights."""
    reason, plan = _inspect_layer(layer)
    if reason is not None:  # the step's plan checked every projection before this call
        raise RuntimeError(f"a projection stopped being fusable during the step: {reason}")
    return plan


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are DTensors (FSDP2's `fully_shard` shards them between calls)."""
    import torch

    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
