"""Sampling settings under vLLM's field names, and the logits filters that implement them.

The docs' GRPO notebooks build `SamplingParams(temperature=..., top_p=..., max_tokens=...)` for
vLLM; velotune's engine takes the same names so those cells run unchanged. The filters work on
one (B, V) row of next-token logits per sequence, in the order vLLM and transformers apply
them: penalties, temperature, top-k, top-p, min-p. A token is then drawn with the exponential
race (argmax of p / E, E ~ Exp(1)), which equals multinomial sampling, needs no host sync, and
takes an explicit `torch.Generator` so a seed reproduces a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# vLLM treats temperatures below this as greedy decoding.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """What to generate per prompt; the field names and defaults are vLLM's.

    `logprobs`: None (no log-probabilities) or an int; when set, each completion carries the
    log-probability of every chosen token under the model's raw distribution (temperature 1, no
    filter), the quantity GRPO's importance ratios use. `truncate_prompt_tokens`: keep only the
    last k tokens of a prompt (otherwise a prompt longer than the context is an error).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    detokenize: bool = True

    def __post_init__(self):
        _integer("n", self.n, 1)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        _integer("min_tokens", self.min_tokens, 0)
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 is greedy decoding)")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 keeps every token)")
        _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1] (0 keeps every token)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 1, or 0 / -1 for no top-k")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0 (1 is no penalty)")
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r}: must be an integer or None")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0)
        if self.truncate_prompt_tokens is not None:
            _integer("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: must be a string or a list of strings")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def needs_seen(self) -> bool:
        """The repetition penalty looks at prompt and output tokens (a (B, V) bool map)."""
        return self.repetition_penalty != 1.0

    @property
    def needs_counts(self) -> bool:
        """Presence/frequency penalties count output tokens only (a (B, V) count map)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                    counts: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) fp32 -> penalised logits. `seen` (B, V) bool: tokens of prompt or output
    (repetition penalty: positive logits divided, negative multiplied, as transformers and vLLM);
    `counts` (B, V): how often each token was generated (presence / frequency penalties)."""
    if seen is not None and params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None:
        counts = counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) fp32, penalised -> temperature-scaled logits with removed tokens at -inf."""
    logits = logits / params.temperature
    if params.top_k_active and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        remove_sorted = before >= params.top_p  # the most likely token always stays (before = 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        floor = params.min_p * probs.max(-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < floor, -math.inf)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) (any float dtype): greedy, or drawn from the filtered
    distribution with `generator` (None: torch's default generator)."""
    logits = apply_penalties(logits.float(), params, seen, counts)
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)  # (B, V)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw (temperature 1, unfiltered) distribution: logits (B, V), tokens (B,) -> (B,)."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
