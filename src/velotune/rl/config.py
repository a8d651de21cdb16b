"""`GRPOConfig`: TRL's `GRPOConfig` (same field names and meaning) plus what the docs' notebooks pass.

Why a subclass of TRL's config and not our `TrainingArguments`: GRPO's fields (num_generations,
beta, epsilon, loss_type, ...) are TRL's, and users move between TRL's documentation and ours.
Added: `max_prompt_length` (TRL 1.x dropped it; the docs' notebooks set it), and
`sample_completions_steps` (print sample completions every N steps, as the docs' runs show).
The same defaults and checks as velotune's SFT arguments apply: 8-bit AdamW falls back where
bitsandbytes cannot step it, fp16 on a CPU-only machine trains in fp32.

The docs' notebooks pass `per_device_train_batch_size=1` with `num_generations=6` or 8 (written when a
batch counted prompts). TRL 1.x counts completions and refuses a generation batch that cannot hold whole
groups; Unsloth raises the batch to num_generations with a printed notice. velotune does what Unsloth
users see (`fit_batch_to_groups`): a batch that cannot hold whole groups becomes the largest multiple of
num_generations not above it (at least num_generations), logged once. Settings that cannot work still
fail, naming the values that do: num_generations < 2, or an explicit generation_batch_size that is not a
multiple of num_generations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from trl import GRPOConfig as TRLGRPOConfig

from ..training.arguments import after_post_init, before_post_init
from ..training.compat import LEGACY_HELP


logger = logging.getLogger("velotune")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _divisors(n: int, low: int = 2) -> list[int]:
    return [d for d in range(low, n + 1) if n % d == 0]


def check_num_generations(num_generations) -> None:
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations={num_generations!r}: GRPO compares completions of the same prompt, so it "
                         "needs at least 2 (the docs use 6 or 8)")


def fit_batch_to_groups(per_device_train_batch_size: int, steps_per_generation: int, num_generations: int) -> int:
    """The per-device batch to train with: the given one when its generation batch (x steps_per_generation)
    holds whole groups (TRL's rule: then a group may span micro-batches), else the largest multiple of
    num_generations not above it and at least num_generations (the docs' batch 1 with 6 generations -> 6, one
    prompt's group per micro-batch, as Unsloth's notebooks run it; never more completions per micro-batch
    than asked for unless fewer than one group was asked for)."""
    check_num_generations(num_generations)
    if per_device_train_batch_size * steps_per_generation % num_generations == 0:
        return per_device_train_batch_size
    return max(num_generations, per_device_train_batch_size // num_generations * num_generations)


@dataclass
class GRPOConfig(TRLGRPOConfig):
    """TRL's GRPOConfig, with `max_prompt_length` and `sample_completions_steps`.

    max_prompt_length: prompts longer than this many tokens keep their last tokens (the question
        usually ends a prompt); the run logs how many rows were cut. None: no limit.
    sample_completions_steps: print a few sampled completions with their rewards every this many
        steps (0: only with TRL's `log_completions=True`, at every logging step).
    use_vllm: accepted for the docs' settings; generation always runs on velotune's own engine
        with the adapters being trained (colocated, no weight sync), vLLM or not.
    """

    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Longer prompts keep their last tokens (None: no limit)."})
    sample_completions_steps: int = field(
        default=0, metadata={"help": "Print sample completions every N steps (0: off unless log_completions)."})
    # The docs' notebooks pass warmup_ratio, which transformers 5 dropped (training/compat.py maps it).
    warmup_ratio: float | None = field(default=None, metadata={"help": LEGACY_HELP["warmup_ratio"]})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: get_peft_model's use_gradient_checkpointing decides (TRL: True)."})

    def __post_init__(self):
        before_post_init(self)  # velotune's shared checks and device defaults (training/arguments.py)
        check_num_generations(self.num_generations)
        if self.generation_batch_size is None:
            self._fit_batch()
        elif self.generation_batch_size % self.num_generations:
            G = self.num_generations
            raise ValueError(f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                             f"num_generations={G}: generation_batch_size in {[G * k for k in range(1, 5)]}, or "
                             f"num_generations in {_divisors(self.generation_batch_size) or 'none'}")
        self._check_choices()
        super().__post_init__()
        after_post_init(self)

    def _fit_batch(self) -> None:
        """The docs' per_device_train_batch_size=1 (see the module docstring): adjusted, with one notice."""
        steps = self.steps_per_generation or self.gradient_accumulation_steps
        fitted = fit_batch_to_groups(self.per_device_train_batch_size, steps, self.num_generations)
        if fitted == self.per_device_train_batch_size:
            return
        steps_name = "steps_per_generation" if self.steps_per_generation else "gradient_accumulation_steps"
        logger.warning(
            "velotune: per_device_train_batch_size=%d -> %d. A GRPO batch counts completions (TRL 1.x), and one "
            "generation batch (per_device_train_batch_size x %s=%d = %d completions) must hold whole groups of "
            "num_generations=%d; each micro-batch now holds %d prompt(s) x %d completions, as Unsloth runs the "
            "docs' notebooks. A multiple of num_generations as per_device_train_batch_size is taken as given.",
            self.per_device_train_batch_size, fitted, steps_name, steps, self.per_device_train_batch_size * steps,
            self.num_generations, fitted // self.num_generations, self.num_generations)
        self.per_device_train_batch_size = fitted

    def _check_choices(self) -> None:
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        choices = (("loss_type", self.loss_type, LOSS_TYPES),
                   ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS),
                   ("scale_rewards", scale, SCALE_REWARDS),
                   ("multi_objective_aggregation", getattr(self, "multi_objective_aggregation", AGGREGATIONS[0]),
                    AGGREGATIONS))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: velotune's GRPOTrainer supports {list(allowed)}")
        for name in ("temperature", "learning_rate", "epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}: must be a finite number > 0")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high={self.epsilon_high!r}: must be > 0 (or None: same as epsilon)")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta={self.beta!r}: the KL coefficient must be >= 0 (0 skips the reference pass)")
        if not (isinstance(self.num_iterations, int) and self.num_iterations >= 1):
            raise ValueError(f"num_iterations={self.num_iterations!r}: must be an integer >= 1")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length!r}: must be >= 1 token")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length!r}: must be >= 1 token, or None")
        unsupported = {"top_entropy_quantile": (getattr(self, "top_entropy_quantile", 1.0), 1.0),
                       "off_policy_mask_threshold": (getattr(self, "off_policy_mask_threshold", None), None),
                       "entropy_coef": (getattr(self, "entropy_coef", 0.0), 0.0),
                       "use_adaptive_entropy": (getattr(self, "use_adaptive_entropy", False), False),
                       "sync_ref_model": (getattr(self, "sync_ref_model", False), False)}
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by velotune's GRPOTrainer yet; leave it at "
                                 f"{default!r} (TRL's own GRPOTrainer supports it)")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
