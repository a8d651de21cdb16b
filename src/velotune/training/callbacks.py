"""Callbacks that make a run visible: progress-bar fields, a loss plot and a closing summary.

They are plain `TrainerCallback`s, so they also work with transformers' or TRL's own trainers
(`callbacks=[LossPlotCallback(), SummaryCallback()]`); velotune's trainer adds them itself.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger("velotune")
GIB = 1024 ** 3
PLOT_NAME = "training_loss.png"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class ProgressFieldsCallback(ProgressCallback):
    """transformers' progress bar, with loss, learning rate, tokens/s and memory shown on the bar."""

    FIELDS = (("loss", "loss", "{:.4f}"), ("learning_rate", "lr", "{:.2e}"),
              ("tokens_per_second", "tok/s", "{:.0f}"), ("peak_memory_gb", "mem GB", "{:.2f}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = getattr(self, "training_bar", None)
        if state.is_world_process_zero and bar is not None and logs:
            bar.set_postfix({short: fmt.format(logs[key]) for key, short, fmt in self.FIELDS
                             if isinstance(logs.get(key), (int, float))}, refresh=False)
        if logs and ("loss" in logs or "train_runtime" in logs):
            if bar is not None:
                bar.refresh()  # the bar shows each step, the summary ends the run: no dict under the bar per step
            return None
        return super().on_log(args, state, control, logs=logs, **kwargs)  # evaluation results are printed


class LossPlotCallback(TrainerCallback):
    """At the end of training, write output_dir/training_loss.png with the train (and eval) loss."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = write_loss_plot(state.log_history, Path(args.output_dir))
        if path is not None:
            logger.info("velotune: loss plot written to %s", path)


def write_loss_plot(log_history: list[dict], folder: Path) -> Path | None:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    try:
        from matplotlib.figure import Figure  # optional (dev extra); no pyplot, so no GUI backend needed
    except ImportError:
        logger.warning("velotune: matplotlib is not installed, so no loss plot was written (pip install matplotlib)")
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    folder.mkdir(parents=True, exist_ok=True)
    path = plot_path(folder)
    figure.savefig(path, metadata={"Software": PLOT_SIGNATURE})
    return path


PLOT_SIGNATURE = "velotune loss plot"


def plot_path(folder: Path) -> Path:
    """`training_loss.png`, unless a file of that name is not a velotune plot: then the first free
    `training_loss-N.png` (a user's image is never overwritten)."""
    path = folder / PLOT_NAME
    n = 1
    while path.exists() and PLOT_SIGNATURE.encode() not in path.read_bytes()[:4096]:
        n += 1
        path = folder / f"{Path(PLOT_NAME).stem}-{n}.png"
    if n > 1:
        logger.warning("velotune: %s was not written by velotune, so the loss plot goes to %s", folder / PLOT_NAME,
                       path)
    return path


class SummaryCallback(TrainerCallback):
    """Prints time, tokens/s, peak memory and trainable parameters when training ends."""

    def __init__(self):
        self.started = None
        self.tokens_at_start = 0
        self.last_summary: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.started is None:
            return
        seconds = time.perf_counter() - self.started
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        parts = [f"{state.global_step} steps in {seconds:.1f} s"]
        if tokens:
            parts.append(f"{tokens} tokens ({tokens / max(seconds, 1e-9):.0f} tokens/s)")
        parts.append(f"peak memory {peak_memory_bytes(args.device) / GIB:.2f} GiB ({args.device.type})")
        if model is not None:
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            parts.append(f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        self.last_summary = "velotune: trained " + "; ".join(parts)
        logger.info(self.last_summary)
