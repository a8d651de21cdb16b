"""`TrainingArguments`: TRL's `SFTConfig` plus the Unsloth API's `embedding_learning_rate` and defaults.

Why a subclass and not a patch: the docs pass either transformers' `TrainingArguments` or
TRL's `SFTConfig` to the trainer; velotune's trainer converts both into this class so that one
place decides the optimizer fallback, the precision default and the checks that must fail
before any dataset work starts (a learning rate or batch size of 0 would otherwise surface
as a silent no-op run or a crash deep inside the data loader).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from ..device import is_bfloat16_supported
from .compat import LEGACY_HELP, apply_legacy

logger = logging.getLogger("velotune")

# transformers' names of the bitsandbytes 8-bit optimizers, and the plain optimizer each falls back to.
EIGHT_BIT_FALLBACKS = {
    "adamw_8bit": "adamw_torch", "adamw_bnb_8bit": "adamw_torch", "paged_adamw_8bit": "adamw_torch",
    "lion_8bit": "lion_32bit", "paged_lion_8bit": "lion_32bit",
}
MEMORY_CHECK_CHOICES = ("error", "warn", "off")


@functools.lru_cache(maxsize=None)
def eight_bit_adamw_works(device_type: str) -> bool:
    """Whether bitsandbytes' 8-bit AdamW takes a real step on this device type (tried once, cached).

    Asking the library is not enough: builds exist whose optimizer kernels are missing for a device.
    """
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.ones(4096, device=device_type))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.full_like(param, 0.5)
        optimizer.step()
        return bool(torch.isfinite(param).all()) and bool((param < 1).all())
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite positive number; nothing was trained. "
                         f"Set {name} in TrainingArguments to a value > 0")


def _check_finite(args) -> None:
    """NaN/inf in any numeric argument (a typo, a computed value) would surface later as a non-finite
    loss blamed on dataset rows; name the argument instead."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r}: must be a finite number; nothing was trained. "
                             f"Set {f.name} in TrainingArguments to a real value")


@dataclass
class TrainingArguments(SFTConfig):
    """SFTConfig with the Unsloth API's defaults (8-bit AdamW, bf16 when supported) and two additions.

    embedding_learning_rate: learning rate of `embed_tokens`/`lm_head` when they train (continued
        pretraining); the docs recommend 2-10x smaller than `learning_rate`. None: same as it.
    memory_check: what to do when the memory estimate clearly exceeds the device: "error"
        (default, before any work), "warn", or "off".
    """

    embedding_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of embed_tokens/lm_head (None: learning_rate)."})
    memory_check: str = field(
        default="error", metadata={"help": "When the estimate clearly exceeds device memory: error, warn or off."})
    optim: str = field(default="adamw_8bit", metadata={"help": "Optimizer (8-bit AdamW, else AdamW)."})
    include_num_input_tokens_seen: str | bool = field(
        default="non_padding", metadata={"help": "Count tokens for tokens/s (all, non_padding or no)."})
    # Keywords the docs pass that transformers 5 / TRL 1.x dropped; compat.apply_legacy maps them.
    warmup_ratio: float | None = field(default=None, metadata={"help": LEGACY_HELP["warmup_ratio"]})
    max_seq_length: int | None = field(default=None, metadata={"help": LEGACY_HELP["max_seq_length"]})
    evaluation_strategy: str | None = field(default=None, metadata={"help": LEGACY_HELP["evaluation_strategy"]})

    def __post_init__(self):
        before_post_init(self)
        _check_positive("embedding_learning_rate", self.embedding_learning_rate, allow_none=True)
        if self.memory_check not in MEMORY_CHECK_CHOICES:
            raise ValueError(f"memory_check={self.memory_check!r}: allowed values are {MEMORY_CHECK_CHOICES}")
        super().__post_init__()
        after_post_init(self)


def before_post_init(args) -> None:
    """The checks and device defaults every velotune arguments class runs before transformers' own
    `__post_init__` (TrainingArguments here; the preference configs in rl/preference_args.py)."""
    apply_legacy(args)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive integer; nothing was trained")
    _check_positive("learning_rate", args.learning_rate)
    _check_finite(args)
    if args.max_steps == 0:
        raise ValueError("max_steps=0: would train nothing (transformers would silently take one step). "
                         "Set max_steps to a positive number of steps, or to -1 to train num_train_epochs")
    if getattr(args, "max_length", None) is not None:
        _check_positive("max_length (max_seq_length)", args.max_length)
    if args.bf16 is None and args.fp16 in (None, False):
        args.bf16 = is_bfloat16_supported()
        args.fp16 = not args.bf16
    if args.fp16 and not _has_accelerator():
        # The docs' `fp16 = not is_bfloat16_supported()` asks for fp16 on every CPU-only machine, where
        # fp16 autocast is emulated: one SmolLM2 LoRA step took 167 s in fp16 against 9 s in fp32.
        args.fp16, args.bf16 = False, bool(args.bf16)
        logger.info("velotune: no GPU, so fp16=True trains in fp32 (fp16 is emulated on the CPU and about "
                    "18x slower); bf16=True keeps bf16 autocast on the CPU")
    if args.bf16 and not _has_accelerator():
        # transformers refuses bf16 without a GPU unless use_cpu is set; torch autocasts bf16 on the CPU.
        args.use_cpu = True
    if args.dataloader_pin_memory and not _has_accelerator():
        args.dataloader_pin_memory = False  # nothing to pin for; torch warns on every dataloader otherwise
    # TRL's configs default gradient_checkpointing=True, which transformers 5.24 renamed
    # activation_checkpointing: move the values to the new names so no FutureWarning is raised.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if getattr(args, new, False) is None and getattr(args, old, None) is not None:
            setattr(args, new, getattr(args, old))


def after_post_init(args) -> None:
    """After transformers' `__post_init__` (the device is known): an 8-bit optimizer that cannot step
    on this device falls back to its plain twin, with one warning."""
    optim = getattr(args.optim, "value", args.optim)
    if optim in EIGHT_BIT_FALLBACKS and not eight_bit_adamw_works(args.device.type):
        fallback = EIGHT_BIT_FALLBACKS[optim]
        logger.warning("velotune: bitsandbytes has no working 8-bit optimizer on %s; optim=%r falls back to %r",
                       args.device.type, optim, fallback)
        args.optim = type(args.optim)(fallback) if not isinstance(args.optim, str) else fallback


# The Unsloth API's name for the same class.
UnslothTrainingArguments = TrainingArguments
