"""Checks before resuming: the checkpoint fits the model, and a finished run is not trained further.

Why: transformers resumes a run that already reached `max_steps` by taking one more step (the
weights change, and the saved final checkpoint no longer matches the model), and a checkpoint
whose adapter has another rank fails deep inside `load_state_dict` with a size mismatch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("velotune")

# LoraConfig fields that must match for a checkpoint's adapter to load into the model's.
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "modules_to_save", "use_dora")


def resolve(resume_from_checkpoint, output_dir) -> Path | None:
    """The checkpoint folder `train(resume_from_checkpoint=...)` will read, or None (a fresh start, or
    none found: transformers then raises its own error)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        from .checkpoints import ours

        mine = ours(Path(output_dir))
        if mine:  # a folder of the user's named checkpoint-<n> is not this run's checkpoint
            return mine[-1][1]
        found = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        return Path(found) if found else None  # checkpoints of transformers or an older velotune
    path = Path(resume_from_checkpoint)
    return path if path.is_dir() else None


def _comparable(name: str, value):
    if name in ("target_modules", "modules_to_save") and value is not None and not isinstance(value, str):
        return sorted(value)
    return value


def check_adapter_matches(model, checkpoint: Path) -> None:
    """Raise before loading when the checkpoint's LoRA settings differ from the model's adapter."""
    config_file = checkpoint / "adapter_config.json"
    peft_config = getattr(model, "peft_config", None)
    if not config_file.is_file() or not isinstance(peft_config, dict) or "default" not in peft_config:
        return
    saved = json.loads(config_file.read_text())
    current = peft_config["default"]
    differ = []
    for name in ADAPTER_FIELDS:
        if name not in saved or not hasattr(current, name):
            continue
        ours = _comparable(name, getattr(current, name))
        theirs = _comparable(name, saved[name])
        if ours != theirs and not (not ours and not theirs):
            differ.append((name, theirs, ours))
    if differ:
        listed = ", ".join(f"{name}={theirs!r} (the model has {ours!r})" for name, theirs, ours in differ)
        fix = ", ".join(f"{name}={theirs!r}" for name, theirs, _ in differ)
        raise ValueError(f"cannot resume from {checkpoint}: its adapter was trained with {listed}. Call "
                         f"get_peft_model with {fix} to resume this run, or train into a new output_dir to start "
                         "over with the new settings; nothing was loaded or changed")


def finished_output(trainer, checkpoint: Path):
    """When `checkpoint` ends the run the trainer is configured for: load its weights and state, say so,
    and return the TrainOutput `train()` returns; else None."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    args = trainer.args
    if args.max_steps is not None and args.max_steps > 0:
        done = state.global_step >= args.max_steps
        target = f"max_steps={args.max_steps}"
    else:
        done = state.epoch is not None and state.epoch >= args.num_train_epochs - 1e-6
        target = f"num_train_epochs={args.num_train_epochs}"
    if not done:
        return None
    trainer._load_from_checkpoint(str(checkpoint))  # the model holds the finished run's weights
    trainer.state = state
    logger.warning("velotune: the run in %s is already complete (step %d, %s); nothing was trained and nothing "
                   "changed. Raise max_steps or num_train_epochs to train further", checkpoint, state.global_step,
                   target)
    losses = [entry["train_loss"] for entry in state.log_history if "train_loss" in entry]
    loss = losses[-1] if losses else float("nan")
    return TrainOutput(state.global_step, loss, {"train_loss": loss, "already_complete": True})
