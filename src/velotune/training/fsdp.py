"""FSDP2 under velotune's trainer: the switch, the sharding of our model, and how the Trainer sees it.

The switch is transformers' own: `TrainingArguments(fsdp=True)` (or the older `fsdp="full_shard"`),
with `fsdp_config` for the details, as a TRL/transformers user writes it, launched by torchrun or
`accelerate launch` (no FSDP config file needed). velotune then shards the model itself instead of
handing the switch to accelerate, for three reasons:

* one path on every machine: accelerate only turns FSDP on for GPU launches (its state keeps a CPU
  launch as MULTI_CPU, i.e. DDP), so CI could not test its path; `fully_shard` itself runs on gloo;
* our model classes know their decoder layers: each `DecoderLayer` is one FSDP2 unit (its weights are
  gathered right before its call, where the per_layer step plan resolves its projections; see
  fast/plan.py), then the whole model (embeddings, final norm, lm_head) is the root unit;
* checkpoints: velotune writes torch distributed checkpoints (checkpoints_dcp.py), which resume on
  any number of ranks and consolidate into an ordinary folder.

Mixed precision (`MixedPrecisionPolicy`): with `bf16=True` on GPUs, each unit's weights are gathered
and computed in bf16 (`param_dtype`), gradients are reduce-scattered in fp32 (`reduce_dtype`), and
the sharded weights and the optimizer state keep the dtype the model was loaded in (bf16 by default
on a GPU; fp32 adapters stay fp32). On the CPU (gloo, the tests) and with `bf16=False` everything
stays in the loaded dtype and the reduction is fp32.

transformers' Trainer would hand a model with DTensor weights to accelerate, which wraps it in DDP
(and refuses DTensors). `ShardedModel` is the wrapped model the Trainer trains, as DataParallel or
SageMaker's wrappers are: accelerate then prepares only the optimizer, and `no_sync` (which
accelerate's gradient accumulation calls) holds the reduce-scatter until the last micro-batch when the
trainable weights are small (LoRA); full fine-tuning reduces every micro-batch (`defers_reduction`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..fast.plan import find_decoder

logger = logging.getLogger("velotune")

# fsdp_config keys velotune reads; the rest of transformers' defaults (min_num_params, xla, ...) mean nothing here.
HONOURED = ("version", "reshard_after_forward")
REFUSED = {
    "cpu_offload": "keeping sharded weights in host memory is not supported by velotune's sharding yet; drop it",
    "activation_checkpointing": "use get_peft_model(..., use_gradient_checkpointing='unsloth' or True), which "
                                "checkpoints each decoder layer inside its FSDP2 unit",
    "offload_params": "keeping sharded weights in host memory is not supported by velotune's sharding yet; drop it",
}
IGNORED_WITH_NOTICE = ("auto_wrap_policy", "transformer_layer_cls_to_wrap")


@dataclass(frozen=True)
class Sharding:
    """What velotune's FSDP2 does for one run (read from TrainingArguments' fsdp / fsdp_config)."""

    reshard_after_forward: bool = True

    def mixed_precision(self, args, device: torch.device):
        """The MixedPrecisionPolicy: bf16 compute with fp32 reduction on GPUs when bf16 is on; else the
        loaded dtype throughout (fp32 on the CPU), still reducing in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        bf16 = bool(getattr(args, "bf16", False)) and device.type == "cuda"
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)


def requested(args) -> Sharding | None:
    """The Sharding that `args.fsdp` / `args.fsdp_config` ask for, or None; an error names an option
    velotune's sharding does not do, and the way out."""
    if not getattr(args, "fsdp", None):
        return None
    items = args.fsdp.split() if isinstance(args.fsdp, str) else list(args.fsdp) if isinstance(args.fsdp, list) else []
    config = {k[5:] if k.startswith("fsdp_") else k: v for k, v in dict(args.fsdp_config or {}).items()}
    for item in (str(getattr(i, "value", i)) for i in items):
        if item not in ("full_shard", "shard_grad_op", "auto_wrap"):
            raise ValueError(f"fsdp={args.fsdp!r}: velotune shards with FSDP2 (fully_shard per decoder layer), "
                             f"which has no {item!r}; use fsdp=True (or 'full_shard'), or 'shard_grad_op' to keep "
                             "gathered weights from forward to backward")
        if item == "shard_grad_op":
            config.setdefault("reshard_after_forward", False)
    version = int(config.get("version", 2))
    if version != 2:
        raise ValueError(f"fsdp_config version={version}: velotune shards with FSDP2 (torch's fully_shard) only; "
                         "remove 'version' or set it to 2")
    for key, why in REFUSED.items():
        if _truthy(config.get(key)):
            raise ValueError(f"fsdp_config {key}={config[key]!r}: {why}")
    for key in IGNORED_WITH_NOTICE:
        if config.get(key) not in (None, "TRANSFORMER_BASED_WRAP"):
            logger.warning("velotune: fsdp_config %s=%r is not used: velotune shards each decoder layer, then the "
                           "whole model", key, config[key])
    return Sharding(reshard_after_forward=_truthy(config.get("reshard_after_forward", True)))


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def check_shardable(model, args) -> None:
    """Errors before any work: FSDP2 through accelerate's own FSDP config, or weights FSDP2 cannot shard."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "this process was started by `accelerate launch` with an FSDP config, which would make accelerate "
            "shard the model a second time. velotune shards it itself: launch with torchrun (or accelerate launch "
            "without the FSDP config) and set fsdp=True in TrainingArguments")
    if find_decoder(model) is None:
        raise ValueError(f"fsdp=True: velotune shards its own decoder classes per layer, and {type(model).__name__} "
                         "holds none (a model on the generic transformers path); train it with DDP (drop fsdp)")
    quantized = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise ValueError(f"fsdp=True cannot shard 4-bit (NF4) weights such as {quantized[0]}: FSDP2 shards 16/32-bit "
                         "weights. For QLoRA on several GPUs drop fsdp (DDP: each GPU holds its own NF4 copy), or "
                         "load the model in 16-bit (load_in_4bit=False) to shard it")


def shard(model: nn.Module, sharding: Sharding, args) -> nn.Module:
    """`fully_shard` each decoder layer, then the whole model (in place; returns it), over all ranks on
    `args.device`'s kind of device. Every rank must hold the same weights first (from_pretrained of one
    checkpoint, get_peft_model with one random_state). A model loaded into host memory
    (`device_map="cpu"`) moves to this rank's GPU one layer at a time as it is sharded, so no GPU ever
    holds more than its shard plus one layer: how a model too big for one GPU gets onto several."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = getattr(args, "device", None) or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = dict(mesh=mesh, mp_policy=sharding.mixed_precision(args, device),
                   reshard_after_forward=sharding.reshard_after_forward)
    decoder = find_decoder(model)
    for layer in decoder.layers:
        fully_shard(layer, **options)  # gathered just before the layer's call, freed after it (and again for backward)
    fully_shard(model, **options)  # embeddings, final norm, lm_head: the root unit
    return model


def per_rank(estimate, world: int):
    """One GPU's share of a memory estimate (training/memory.py) made for the unsharded model: weights,
    gradients and optimizer state are split over `world` ranks (plus one gathered layer at a time,
    small beside them); activations are each rank's own."""
    return dataclasses.replace(estimate, weights=estimate.weights // world, gradients=estimate.gradients // world,
                               optimizer=estimate.optimizer // world)


def active() -> bool:
    """Whether a process group of several ranks is up (FSDP2 shards over it)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class ShardedModel(nn.Module):
    """The model the Trainer trains under velotune's FSDP2: the sharded model, called through.

    A wrapper only in the Trainer's eyes (it prepares wrapped models' optimizers, never the models):
    the forward is the sharded model's, whose FSDP2 hooks gather and reduce. `no_sync` defers the
    gradient reduce-scatter over an accumulation window, as DDP's no_sync defers its all-reduce."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.defers_reduction = defers_reduction(module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        if not self.defers_reduction:  # full fine-tuning: reduce-scatter every micro-batch, keep gradients sharded
            yield
            return
        self.module.set_requires_gradient_sync(False)  # FSDP2: keep unsharded gradients, reduce at the window's end
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


# Largest unsharded gradient (bytes, all trainable weights) worth holding over an accumulation window.
DEFER_REDUCTION_MAX_BYTES = 1 << 30


def defers_reduction(model: nn.Module) -> bool:
    """Whether gradient accumulation should hold FSDP2's reduce-scatter until the window's last micro-batch.

    Holding it keeps every trainable weight's gradient unsharded in the meantime: for LoRA adapters (tens of
    MB) that saves one collective per micro-batch for nothing, but for full fine-tuning it is a whole
    unsharded copy of the model's gradients (8B: 16 GB a GPU), which defeats the sharding. Measured on 2
    H200s, 8B full fine-tuning, batch 1 x accumulation 4 (BENCHMARKS.md): holding it cost 16 GiB a GPU and
    was slower than reducing each micro-batch (the reduce-scatter overlaps the next layer's backward)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # DTensor: global
    return size <= DEFER_REDUCTION_MAX_BYTES
