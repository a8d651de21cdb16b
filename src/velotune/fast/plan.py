"""The one place that decides whether a model runs the GPU fast path or the exact plain path.

Fast path: our decoder layers run the fused LoRA autograd functions (lora_linear.py, lora_mlp.py) and the
kernels (RMSNorm, RoPE, SwiGLU/GeGLU), and the causal-LM loss in training goes through the fused
linear cross-entropy. It turns on by itself when all of these hold:

  * `VELOTUNE_DISABLE_KERNELS` is not set to 1 and the model's `fast_path` setting is not False;
  * the model is one of our own decoders (the generic transformers path never is);
  * its weights are on CUDA (or the setting is True, which tests use to run it on the CPU);
  * every projection of every layer is a Linear / bitsandbytes Linear4bit or a PEFT LoRA layer
    over one with one active adapter, lora_dropout 0, no bias training and no LoRA variant (DoRA);
  * the MLP activation has a gated kernel (SwiGLU, GeGLU tanh/exact).

Anything else keeps today's module-by-module code exactly. The decision and its reason are
logged once per distinct reason.

An enabled decision also carries each layer's projections in the form the fused functions take
(`LayerPlan`), resolved while checking them: the layers then use these instead of inspecting
their PEFT modules again on every call (the forward and the checkpoint's recomputation), which on
a small model's host-bound step was a measurable part of the time. The decision is made once per
model forward, so adapter switches, merges and `disable_adapter()` between forwards are seen.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger("velotune")

DISABLE_ENV = "VELOTUNE_DISABLE_KERNELS"
RETURN_LOGITS_ENV = "VELOTUNE_RETURN_LOGITS"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_TRUE = ("1", "true", "yes", "on")
_logged: set[str] = set()


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer's fused projections (lora_linear.py `LoraProjection`s), by group."""

    qkv: tuple  # q, k, v
    o: tuple  # (o,)
    mlp: tuple  # gate, up, down


@dataclass(frozen=True)
class FastPathDecision:
    enabled: bool
    reason: str
    # True when a CUDA model loses the fast path to its own settings (dropout, bias, DoRA, ...):
    # logged as a warning, since that costs speed and memory the user may not expect.
    warn: bool = False
    layers: tuple[LayerPlan, ...] = ()  # one per decoder layer when enabled


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


class FastPathDecoder(nn.Module):
    """Base of the decoders the fast path can run (velotune.models.decoder.DecoderModel).

    Declared here and subclassed there, so the plan recognises our decoder without importing the
    models package, which sits above this one (tests/test_layering.py). A subclass has
    `embed_tokens`, `layers` (each with `mlp.activation` and the PROJECTIONS) and `config`."""

    fast_path: bool | None = None  # None: automatic; see set_fast_path


def find_decoder(model: nn.Module):
    """Our decoder (a `FastPathDecoder`) inside `model` (a PEFT wrapper, a causal LM or the backbone), or None."""
    if isinstance(model, FastPathDecoder):
        return model
    return next((m for m in model.modules() if isinstance(m, FastPathDecoder)), None)


def set_fast_path(model: nn.Module, enabled: bool | None) -> None:
    """True: fast path wherever the LoRA settings allow, even off CUDA (tests, debugging);
    False: always the plain path; None (default): decide automatically."""
    if enabled not in (True, False, None):
        raise ValueError(f"fast_path={enabled!r}: allowed values are True, False and None (automatic)")
    decoder = find_decoder(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} holds no velotune decoder; the fast path exists for the "
                         "families velotune implements itself (llama, mistral, qwen2/3, gemma/2/3, phi3)")
    decoder.fast_path = enabled


def decide(model: nn.Module, fast_path: bool | None = None) -> FastPathDecision:
    """The decision for `model` (any wrapper of our decoder); `fast_path` overrides the model's setting."""
    decision = _decide(model, fast_path)
    if decision.reason not in _logged:
        _logged.add(decision.reason)
        level = logging.WARNING if decision.warn else logging.INFO
        logger.log(level, "velotune: %s path: %s", "fast" if decision.enabled else "plain", decision.reason)
    return decision


def _decide(model: nn.Module, fast_path: bool | None) -> FastPathDecision:
    if _env_flag(DISABLE_ENV):
        return FastPathDecision(False, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} forces the plain path")
    decoder = find_decoder(model)
    if decoder is None:
        return FastPathDecision(False, f"{type(model).__name__} is not a velotune decoder (generic transformers path)")
    setting = decoder.fast_path if fast_path is None else fast_path
    if setting is False:
        return FastPathDecision(False, "fast_path=False forces the plain path")
    device = decoder.embed_tokens.weight.device
    if device.type != "cuda" and setting is not True:
        return FastPathDecision(False, f"the model is on {device.type}, the fast path runs on CUDA")
    from .lora_linear import inspect_projection
    from .lora_mlp import GATED_ACTIVATIONS
    from .ops import FROM_KERNELS

    warn = device.type == "cuda"
    plans = []
    for i, layer in enumerate(decoder.layers):
        if layer.mlp.activation not in GATED_ACTIVATIONS:
            return FastPathDecision(False, f"activation {layer.mlp.activation!r} has no gated kernel "
                                           f"(fused: {', '.join(GATED_ACTIVATIONS)})", warn)
        views = []
        for name in PROJECTIONS:
            reason, view = inspect_projection(layer.get_submodule(name))
            if reason is not None:
                return FastPathDecision(False, f"model.layers.{i}.{name}: {reason}", warn)
            views.append(view)
        plans.append(LayerPlan(qkv=tuple(views[:3]), o=(views[3],), mlp=tuple(views[4:])))
    kernels = ", ".join(FROM_KERNELS) or "none yet (PyTorch reference ops)"
    where = "CUDA" if device.type == "cuda" else f"{device.type}, forced by fast_path=True"
    return FastPathDecision(True, f"{decoder.config.model_type} on {where}; fused LoRA; kernels: {kernels}",
                            layers=tuple(plans))


def logits_wanted(return_logits: bool | None) -> bool:
    """Whether a training forward with labels must still build the full logits.

    The caller asks with `return_logits=True` (or `VELOTUNE_RETURN_LOGITS=1`). Without asking,
    they are built anyway when an imported TRL SFTTrainer reads `outputs.logits` after the loss
    for its entropy/accuracy metrics (TRL before its own fused LM head, e.g. 0.24); TRL versions
    with `add_fused_lm_head` (1.x) compute those metrics themselves and never read our logits.
    """
    if return_logits is not None:
        return bool(return_logits)
    if _env_flag(RETURN_LOGITS_ENV):
        return True
    sft = sys.modules.get("trl.trainer.sft_trainer")
    return sft is not None and not hasattr(sft, "add_fused_lm_head")
