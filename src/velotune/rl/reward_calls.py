"""Calling the user's reward functions, with errors that name the function, the step and the completion.

A reward function is user code run thousands of times on model output nobody has seen yet; when it
fails, the user needs to know which function, at which step, on which completion. When a function
raises on a batch, it is called again on one completion at a time to find the first that fails.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

logger = logging.getLogger("velotune")
MAX_NAN_WARNINGS = 3


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one number per completion."""


def reward_name(function) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def _short(value, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _as_list(result, name: str, step: int, count: int, completions) -> list:
    if isinstance(result, torch.Tensor):
        result = result.detach().cpu().reshape(-1).tolist()
    elif hasattr(result, "tolist") and not isinstance(result, (list, tuple)):  # numpy arrays
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(result).__name__} at step {step}; it must return a list of "
            f"{count} floats, one per completion (first completion: {_short(completions[0])})")
    if len(result) != count:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(result)} values for {count} completions at step {step}; it "
            f"must return one float per completion, in order (first completion: {_short(completions[0])})")
    return list(result)


def _as_float(value, name: str, step: int, index: int, completion, prompt) -> float:
    if value is None:
        return math.nan  # TRL's convention: no score for this completion
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFunctionError(
            f"reward function {name!r} returned {_short(value, 80)} ({type(value).__name__}) for completion {index} "
            f"at step {step}; rewards must be numbers (or None for 'no score'). Completion: {_short(completion)}; "
            f"prompt: {_short(prompt, 150)}")
    if math.isinf(value):
        raise RewardFunctionError(
            f"reward function {name!r} returned {value} for completion {index} at step {step}; an infinite reward "
            f"would make every advantage of its group NaN. Return a large finite number, or None for 'no score'. "
            f"Completion: {_short(completion)}")
    return float(value)


def call_reward_functions(functions, prompts: list, completions: list, columns: dict, step: int,
                          extra: dict | None = None) -> tuple[torch.Tensor, list[str]]:
    """(scores (N, F) fp32 with NaN for 'no score', names). `columns` are the dataset's other columns,
    one value per completion; `extra` (completion_ids, trainer_state) is passed as TRL does."""
    count = len(completions)
    scores = torch.full((count, len(functions)), math.nan)
    names = []
    for j, function in enumerate(functions):
        name = reward_name(function)
        names.append(name)
        kwargs = {**columns, **(extra or {})}
        try:
            result = function(prompts=prompts, completions=completions, **kwargs)
        except RewardFunctionError:
            raise
        except Exception as error:  # noqa: BLE001 - user code: report it with its context
            raise _locate_failure(function, name, prompts, completions, kwargs, step, error) from error
        values = _as_list(result, name, step, count, completions)
        for i, value in enumerate(values):
            scores[i, j] = _as_float(value, name, step, i, completions[i], prompts[i])
    return scores, names


def _locate_failure(function, name, prompts, completions, kwargs, step, error) -> RewardFunctionError:
    for i in range(len(completions)):
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v) for k, v in kwargs.items()}
        try:
            function(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **one)
        except Exception as inner:  # noqa: BLE001
            return RewardFunctionError(
                f"reward function {name!r} raised {type(inner).__name__}: {inner} at step {step} on completion {i}: "
                f"{_short(completions[i])} (prompt: {_short(prompts[i], 150)})")
    return RewardFunctionError(
        f"reward function {name!r} raised {type(error).__name__}: {error} at step {step} on the batch of "
        f"{len(completions)} completions (each alone scores fine; first completion: {_short(completions[0])})")


class NanCounter:
    """Counts NaN scores per function; warns (a few times, then only in the logs) instead of averaging them in."""

    def __init__(self):
        self.total: dict[str, int] = {}
        self.warnings = 0

    def record(self, scores: torch.Tensor, names: list[str], step: int) -> dict[str, int]:
        counts = {}
        for j, name in enumerate(names):
            bad = int(torch.isnan(scores[:, j]).sum())
            if bad:
                counts[name] = bad
                self.total[name] = self.total.get(name, 0) + bad
        if counts and self.warnings < MAX_NAN_WARNINGS:
            self.warnings += 1
            listed = ", ".join(f"{name!r}: {n} of {scores.shape[0]}" for name, n in counts.items())
            more = "" if self.warnings < MAX_NAN_WARNINGS else " (further counts only in the logs: rewards/<name>/nan)"
            logger.warning("velotune: step %d: NaN/None rewards skipped, not averaged in (%s); a completion no "
                           "function scores gets advantage 0%s", step, listed, more)
        return counts
