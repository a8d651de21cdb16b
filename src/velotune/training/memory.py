"""Memory estimate printed before training, so an impossible setting fails in seconds, not at OOM.

Terms (bytes):
  weights      every parameter and buffer as stored (4-bit weights as their packed bytes plus
               their quantization state: absmax and the nested tables).
  trainable    parameters with requires_grad (LoRA adapters, modules_to_save, or all weights).
  gradients    one gradient per trainable parameter, in its dtype.
  optimizer    AdamW keeps two moments per trainable parameter: 2 x its bytes (torch AdamW keeps
               them in the parameter's dtype); bitsandbytes' 8-bit variants keep 2 x 1 byte.
  activations  what backward needs, for tokens = batch x max_seq_length (T), in the compute dtype,
               with H hidden, Q query width, K key/value width, I intermediate, V vocab, L layers.
    plain path (CPU, generic transformers models, LoRA settings the fused path does not take):
               per layer and token 6H + 2K + 3I values (norm inputs/outputs, q/k/v, attention
               output, gate, up, gate*up); with gradient checkpointing only each layer's input (H)
               is kept, plus one layer's full set while it is recomputed. The loss adds the
               logits: T x V in the compute dtype, an fp32 copy when that dtype is 16-bit, and
               the fp32 gradient.
    fast path (fast/plan.py decides: our decoder on CUDA, fusable LoRA): the fused layer keeps
               4H + 2Q + 2K + 2I per token (no act(g)*u); the fused cross-entropy never builds
               the logits (its d hidden, one chunk of logits and the final norm's input: 3H per
               token); the checkpointed MLP recomputes in token chunks (CHUNK_TOKENS rows of 6I);
               "unsloth" checkpointing from OFFLOAD_MIN_TOKENS tokens moves each layer's input to
               pinned host memory (counted in `host`, two layers' inputs in flight on the GPU);
               the CUDA graphs' pool holds about one more layer's working set; 4-bit weights are
               dequantized just in time (one (I, H) weight, three when the MLP runs in chunks);
               with offloading the caching allocator keeps about two attention working sets of
               freed blocks besides (measured: the estimate is of reserved memory, not allocated).
The activation term is an approximation (kernels, LoRA ranks and attention backends move it by
tens of percent); the unit tests check the plain path against saved-tensor bytes measured on a real
model, and BENCHMARKS.md holds the fast path's estimate against measured peaks on the GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..device import model_device

logger = logging.getLogger("velotune")
GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    tokens: int
    checkpointing: bool
    host: int = 0  # pinned host memory: layer inputs offloaded by "unsloth" checkpointing
    fast_path: bool = False

    @property
    def total(self) -> int:
        """Device memory (the host term is checked against the machine's RAM on its own)."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        gb = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        host = f"; pinned host memory {gb(self.host)} GiB" if self.host else ""
        return (f"weights {gb(self.weights)} + gradients {gb(self.gradients)} + optimizer {gb(self.optimizer)} + "
                f"activations {gb(self.activations)} ({self.tokens} tokens/micro-batch, "
                f"{'fast' if self.fast_path else 'plain'} path, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}) = {gb(self.total)} GiB; trainable parameters "
                f"{gb(self.trainable)} GiB{host}")


def _quant_state_bytes(param) -> int:
    state = getattr(param, "quant_state", None)
    if state is None:
        return 0
    total = 0
    for obj in (state, getattr(state, "state2", None)):
        for name in ("absmax", "code"):
            tensor = getattr(obj, name, None) if obj is not None else None
            if torch.is_tensor(tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    params = sum(p.numel() * p.element_size() + _quant_state_bytes(p) for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def trainable_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def optimizer_bytes(model: torch.nn.Module, optim: str) -> int:
    if "sgd" in optim and "momentum" not in optim:
        return 0
    per_value = 1 if "8bit" in optim else None
    return sum(2 * p.numel() * (per_value or p.element_size()) for p in model.parameters() if p.requires_grad)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def uses_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@dataclass(frozen=True)
class _Shape:
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    q_width: int
    kv_width: int

    @classmethod
    def of(cls, model) -> "_Shape":
        config = _text_config(model)
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(hidden, config.num_hidden_layers, config.vocab_size,
                   getattr(config, "intermediate_size", None) or 4 * hidden, heads * head_dim, kv_heads * head_dim)


def activation_parts(model: torch.nn.Module, tokens: int, dtype: torch.dtype, checkpointing: bool) -> tuple[int, int]:
    """Plain path: (bytes saved during forward for backward, extra bytes while one checkpointed layer is recomputed)."""
    m = _Shape.of(model)
    size = torch.finfo(dtype).bits // 8
    per_layer = tokens * (6 * m.hidden + 2 * m.kv_width + 3 * m.intermediate) * size
    logits = tokens * m.vocab * (size + (4 if size < 4 else 0))  # plus an fp32 copy for the loss
    if checkpointing:
        return tokens * m.layers * m.hidden * size + logits, per_layer
    return m.layers * per_layer + logits, 0


def activation_bytes(model: torch.nn.Module, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Plain path's peak activation memory: what forward saves, a recomputed layer, the logits' fp32 gradient."""
    saved, recompute = activation_parts(model, tokens, dtype, checkpointing)
    return saved + recompute + tokens * _Shape.of(model).vocab * 4


@dataclass(frozen=True)
class FastPathMemory:
    """The fast path's activation terms, in bytes (see the module docstring)."""

    device: int  # GPU: saved tensors, one recomputed layer, loss, dequantized weights, graph pool
    host: int  # pinned host memory of the offloaded layer inputs


def fast_path_activations(model, tokens: int, dtype: torch.dtype, checkpointing: bool, offload: bool,
                          graphs: bool, four_bit: bool) -> FastPathMemory:
    from ..fast.lora_mlp import CHUNK_TOKENS

    m = _Shape.of(model)
    size = torch.finfo(dtype).bits // 8
    layer_input = tokens * m.hidden * size  # (T, H)
    attention = tokens * (4 * m.hidden + 2 * m.q_width + 2 * m.kv_width) * size
    full_layer = attention + tokens * 2 * m.intermediate * size  # norms, q/k/v, attention out, gate, up
    chunked = tokens > CHUNK_TOKENS
    loss = 3 * layer_input  # d hidden kept from the fused loss's forward, one chunk of logits, final norm input
    dequantized = (3 if chunked else 1) * m.intermediate * m.hidden * size if four_bit else 0
    if not checkpointing:
        return FastPathMemory(m.layers * full_layer + loss + dequantized, 0)
    recomputed = attention + min(tokens, CHUNK_TOKENS) * 6 * m.intermediate * size
    kept = 2 * layer_input if offload else m.layers * layer_input
    pool = recomputed if graphs else 0
    # Offloading overlaps a layer's recomputation with the next input's copy on a side stream; the caching
    # allocator then holds about two more attention working sets of freed blocks (measured on the H200,
    # BENCHMARKS.md: reserved - allocated = 1.8-2.1 GiB at 1B and 3.4-4.1 GiB at 8B for 32K tokens).
    cache = 2 * attention if offload else 0
    return FastPathMemory(kept + recomputed + loss + dequantized + pool + cache,
                          m.layers * layer_input if offload else 0)


def _runtime(model, tokens: int, checkpointing: bool, fast_path: bool | None, device):
    """The plan of a training step on `device` (None off CUDA or for a model without our decoder)."""
    from ..fast.plan import find_decoder, plan_step

    decoder = find_decoder(model)
    if decoder is None or device.type != "cuda":
        return None
    mode = (decoder.runtime.checkpointing or True) if checkpointing else False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return plan_step(model, training=True, grad=True, labels=True, tokens=tokens, device=device,
                     fast_path=fast_path, checkpointing=mode, lm_head=head)


def estimate(model, batch_size: int, max_seq_length: int, optim: str, compute_dtype: torch.dtype,
             checkpointing: bool | None = None, fast_path: bool | None = None,
             device: torch.device | str | None = None) -> MemoryEstimate:
    """The memory one training step of `model` needs on `device` (default: where its weights are).

    `device="cuda"` for a model still elsewhere (e.g. built on the meta device) estimates it as it
    will run there: the fast path's decision (`fast_path` overrides it), offloading and graphs.
    """
    from ..quant.linear import is_linear4bit

    checkpointing = uses_checkpointing(model) if checkpointing is None else checkpointing
    tokens = batch_size * max_seq_length
    trainable = trainable_bytes(model)
    device = model_device(model) if device is None else device
    plan = _runtime(model, tokens, checkpointing, fast_path, torch.device(device))
    if plan is not None and plan.fast:
        four_bit = any(is_linear4bit(m) for m in model.modules())
        parts = fast_path_activations(model, tokens, compute_dtype, checkpointing, plan.checkpoint == "offload",
                                      plan.graphs, four_bit)
        activations, host = parts.device, parts.host
    else:
        activations, host = activation_bytes(model, tokens, compute_dtype, checkpointing), 0
    weights = weight_bytes(model)
    if plan is not None and plan.host_embedding:  # the input embedding waits in host memory (host_embedding.py)
        table = model.get_input_embeddings().weight
        weights -= table.numel() * table.element_size()
        host += table.numel() * table.element_size()
    return MemoryEstimate(weights=weights, trainable=trainable, gradients=trainable,
                          optimizer=optimizer_bytes(model, optim), activations=activations, tokens=tokens,
                          checkpointing=checkpointing, host=host,
                          fast_path=plan is not None and plan.fast)


def host_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device: torch.device) -> int:
    """Total memory of the device that trains (GPU memory, else the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory()


def advice(est: MemoryEstimate) -> str:
    """The settings to change, biggest term first."""
    tips = []
    if est.activations >= max(est.weights, est.optimizer):
        tips.append("lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch)")
        if not est.checkpointing:
            tips.append('use_gradient_checkpointing="unsloth" in get_peft_model')
        tips.append("lower max_seq_length")
    if est.weights >= est.optimizer:
        tips.append("load_in_4bit=True")
    if est.optimizer > 0:
        tips.append('optim="adamw_8bit"')
    if not tips:
        tips.append("lower per_device_train_batch_size or max_seq_length")
    return "; ".join(tips)


def check_memory(est: MemoryEstimate, available: int, mode: str, device: torch.device) -> str:
    """Log the estimate next to the device's memory (a warning near the limit); error/warn when it
    clearly will not fit."""
    line = f"velotune memory estimate: {est.describe()}; {device.type} has {available / GIB:.2f} GiB"
    logger.log(logging.WARNING if est.total > 0.9 * available else logging.INFO, line)
    if mode == "off":
        return line
    if est.host > 0.8 * host_memory():
        message = (f"offloaded checkpointing needs about {est.host / GIB:.1f} GiB of pinned host memory but the "
                   f"machine has {host_memory() / GIB:.1f} GiB; change: lower per_device_train_batch_size or "
                   "max_seq_length, or use_gradient_checkpointing=True (layer inputs stay on the GPU)")
        if mode == "error":
            raise MemoryError(message)
        logger.warning("velotune: %s", message)
    if est.total > 1.2 * available:
        message = (f"training needs about {est.total / GIB:.1f} GiB but the {device.type} has "
                   f"{available / GIB:.1f} GiB; change: {advice(est)} (memory_check='warn' to try anyway)")
        if mode == "error":
            raise MemoryError(message)
        logger.warning("velotune: %s", message)
    elif est.total > 0.9 * available:
        logger.warning("velotune: the estimate is close to the device memory; if it runs out: %s", advice(est))
    return line
