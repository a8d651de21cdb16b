"""Keywords the docs pass that transformers 5 / TRL 1.x dropped, mapped onto today's fields.

Why here and not in the caller's hands: the docs' cells (`TrainingArguments(warmup_ratio = 0.1,
...)`, `SFTConfig(max_seq_length = ...)`) must run as written. `TrainingArguments` declares each old
name as a field defaulting to None (a dataclass cannot take unknown keywords), and `apply_legacy`
moves a given value onto the current field in `__post_init__`, then clears the old one, so a copy
of the arguments does not map it twice. One log line says what happened when the meaning shifts.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("velotune")

# old name -> current name, same meaning (nothing to say beyond the rename)
RENAMED = {
    "max_seq_length": "max_length",         # TRL 0.20 moved it into SFTConfig as max_length
    "evaluation_strategy": "eval_strategy",  # transformers 4.46 renamed it, 5.0 removed the old name
}
# every old keyword accepted, with the help text of its field
LEGACY_HELP = {
    "warmup_ratio": "Old name: fraction of the steps used for warmup, in [0, 1) (now warmup_steps < 1).",
    "max_seq_length": "Old name of max_length (longest tokenized row).",
    "evaluation_strategy": "Old name of eval_strategy.",
}


def apply_legacy(args) -> None:
    """Move every old keyword set on `args` onto its current field; clear the old one."""
    for old, new in RENAMED.items():
        value = getattr(args, old, None)
        if value is None:
            continue
        current = getattr(args, new)
        if new == "max_length" and current not in (None, 1024) and current != value:  # 1024: SFTConfig's default
            raise ValueError(f"{old}={value!r} and {new}={current!r} disagree: pass one of them ({new} is the "
                             "current name)")
        setattr(args, new, value)
        setattr(args, old, None)
    _warmup_ratio(args)


def _warmup_ratio(args) -> None:
    """transformers 5 dropped warmup_ratio; warmup_steps below 1 is now read as that ratio."""
    ratio = getattr(args, "warmup_ratio", None)
    if ratio is None:
        return
    args.warmup_ratio = None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"warmup_ratio={ratio!r}: must be a fraction in [0, 1) of the training steps; for a "
                         "number of steps pass warmup_steps instead")
    if args.warmup_steps:
        # transformers < 5 let warmup_steps win over warmup_ratio; keep that.
        logger.warning("velotune: warmup_steps=%s and warmup_ratio=%s both given; warmup_steps wins (as in "
                       "transformers 4), warmup_ratio is ignored", args.warmup_steps, ratio)
        return
    if ratio > 0:
        logger.info("velotune: warmup_ratio=%s -> warmup_steps=%s (transformers 5 reads warmup_steps below 1 as a "
                    "fraction of the training steps)", ratio, ratio)
    args.warmup_steps = ratio
