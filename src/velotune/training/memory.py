"""Memory estimate printed before training, so an impossible setting fails in seconds, not at OOM.

Terms (bytes):
  weights      every parameter and buffer as stored (4-bit weights as their packed bytes plus
               their quantization state: absmax and the nested tables).
  trainable    parameters with requires_grad (LoRA adapters, modules_to_save, or all weights).
  gradients    one gradient per trainable parameter, in its dtype.
  optimizer    AdamW keeps two moments per trainable parameter: 2 x its bytes (torch AdamW keeps
               them in the parameter's dtype); bitsandbytes' 8-bit variants keep 2 x 1 byte.
  activations  what backward needs, for tokens = batch x max_seq_length:
               per decoder layer and token, about 6*hidden + 2*kv_width + 3*intermediate values
               (norm inputs/outputs, q/k/v, attention output, gate, up, gate*up) in the compute dtype;
               with gradient checkpointing only each layer's input (hidden values) is kept, plus one
               layer's full set while it is recomputed. The loss adds the logits: tokens x vocab in
               the compute dtype, an fp32 copy when that dtype is 16-bit, and the fp32 gradient.
The activation term is an approximation (kernels, LoRA ranks and attention backends move it by
tens of percent); the unit test checks it against saved-tensor bytes measured on a real model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

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

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        gb = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"weights {gb(self.weights)} + gradients {gb(self.gradients)} + optimizer {gb(self.optimizer)} + "
                f"activations {gb(self.activations)} ({self.tokens} tokens/micro-batch, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}) = {gb(self.total)} GiB; trainable parameters "
                f"{gb(self.trainable)} GiB")


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


def activation_parts(model: torch.nn.Module, tokens: int, dtype: torch.dtype, checkpointing: bool) -> tuple[int, int]:
    """(bytes saved during forward for backward, extra bytes while one checkpointed layer is recomputed)."""
    config = _text_config(model)
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    size = torch.finfo(dtype).bits // 8
    per_layer = tokens * (6 * hidden + 2 * kv_width + 3 * intermediate) * size
    logits = tokens * vocab * (size + (4 if size < 4 else 0))  # plus an fp32 copy for the loss
    if checkpointing:
        return tokens * layers * hidden * size + logits, per_layer
    return layers * per_layer + logits, 0


def activation_bytes(model: torch.nn.Module, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Peak activation memory: what forward saves, a recomputed layer, and the logits' fp32 gradient."""
    saved, recompute = activation_parts(model, tokens, dtype, checkpointing)
    vocab = _text_config(model).vocab_size
    return saved + recompute + tokens * vocab * 4


def estimate(model, batch_size: int, max_seq_length: int, optim: str, compute_dtype: torch.dtype,
             checkpointing: bool | None = None) -> MemoryEstimate:
    checkpointing = uses_checkpointing(model) if checkpointing is None else checkpointing
    tokens = batch_size * max_seq_length
    trainable = trainable_bytes(model)
    return MemoryEstimate(weights=weight_bytes(model), trainable=trainable, gradients=trainable,
                          optimizer=optimizer_bytes(model, optim),
                          activations=activation_bytes(model, tokens, compute_dtype, checkpointing),
                          tokens=tokens, checkpointing=checkpointing)


def device_memory(device: torch.device) -> int:
    """Total memory of the device that trains (GPU memory, else the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
    """Print the estimate next to the device's memory; error/warn when it clearly will not fit."""
    line = f"velotune memory estimate: {est.describe()}; {device.type} has {available / GIB:.2f} GiB"
    logger.warning(line) if est.total > 0.9 * available else logger.info(line)
    print(line)
    if mode == "off":
        return line
    if est.total > 1.2 * available:
        message = (f"training needs about {est.total / GIB:.1f} GiB but the {device.type} has "
                   f"{available / GIB:.1f} GiB; change: {advice(est)} (memory_check='warn' to try anyway)")
        if mode == "error":
            raise MemoryError(message)
        logger.warning("velotune: %s", message)
    elif est.total > 0.9 * available:
        logger.warning("velotune: the estimate is close to the device memory; if it runs out: %s", advice(est))
    return line
