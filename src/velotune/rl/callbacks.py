"""What a GRPO run shows: reward, each reward function, KL, completion length, clip ratio and entropy
on the progress bar (and in the logs `report_to` sends on), and a reward-vs-step plot at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from ..training.callbacks import ProgressFieldsCallback

logger = logging.getLogger("velotune")
PLOT_NAME = "training_reward.png"
PLOT_SIGNATURE = "velotune reward plot"


def short_reward_name(name: str) -> str:
    for suffix in ("_reward_func", "_reward", "_func"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class GRPOProgressCallback(ProgressFieldsCallback):
    """The progress bar with GRPO's numbers: reward (and each function's mean), KL, length, clipping, entropy."""

    FIELDS = (("loss", "loss", "{:.4f}"), ("reward", "reward", "{:.3f}"), ("reward_std", "std", "{:.3f}"),
              ("kl", "kl", "{:.4f}"), ("completions/mean_length", "len", "{:.0f}"),
              ("clip_ratio/region_mean", "clip", "{:.3f}"), ("entropy", "entropy", "{:.3f}"))

    last_fields: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        result = super().on_log(args, state, control, logs=logs, **kwargs)
        bar = getattr(self, "training_bar", None)
        if state.is_world_process_zero and bar is not None and logs and "reward" in logs:
            fields = {short: fmt.format(logs[key]) for key, short, fmt in self.FIELDS
                      if isinstance(logs.get(key), (int, float))}
            fields.update({short_reward_name(key[len("rewards/"):-len("/mean")]): f"{value:.3f}"
                           for key, value in logs.items()
                           if key.startswith("rewards/") and key.endswith("/mean") and isinstance(value, (int, float))})
            self.last_fields = fields  # what the bar showed last (the bar object is closed when training ends)
            bar.set_postfix(fields, refresh=True)
        return result


class RewardPlotCallback(TrainerCallback):
    """At the end of training, write output_dir/training_reward.png: total reward and each function's mean."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = write_reward_plot(state.log_history, Path(args.output_dir))
        if path is not None:
            logger.info("velotune: reward plot written to %s", path)


def reward_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean")):
                label = "total reward" if key == "reward" else key[len("rewards/"):-len("/mean")]
                series.setdefault(label, []).append((entry["step"], value))
    return series


def write_reward_plot(log_history: list[dict], folder: Path) -> Path | None:
    series = reward_series(log_history)
    if not series:
        return None
    try:
        from matplotlib.figure import Figure  # optional (dev extra); no pyplot, so no GUI backend needed
    except ImportError:
        logger.warning("velotune: matplotlib is not installed, so no reward plot was written (pip install matplotlib)")
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for label, points in series.items():
        axes.plot(*zip(*points), label=label, linewidth=2.0 if label == "total reward" else 1.0)
    axes.set_xlabel("step")
    axes.set_ylabel("reward")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLOT_NAME
    n = 1
    while path.exists() and PLOT_SIGNATURE.encode() not in path.read_bytes()[:4096]:
        n += 1  # a file of that name that velotune did not write is never overwritten
        path = folder / f"{Path(PLOT_NAME).stem}-{n}.png"
    figure.savefig(path, metadata={"Software": PLOT_SIGNATURE})
    return path
