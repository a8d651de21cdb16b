"""vLLM-shaped results: what `fast_generate` and `generate_batch` return.

The docs' GRPO notebooks read `outputs[0].outputs[0].text`; TRL's vLLM integration reads
`.prompt_token_ids`, `.outputs[i].token_ids`, `.finish_reason`. Plain records, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled continuation. `token_ids` include the EOS / stop token that ended it (as vLLM);
    `text` excludes special tokens (skip_special_tokens) and a matched stop string (unless
    include_stop_str_in_output); `logprobs`: per chosen token, log p under the raw model
    distribution (temperature 1, unfiltered), when SamplingParams.logprobs was set."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[float] | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that matched; None for EOS / length

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(self.logprobs))


@dataclass
class RequestOutput:
    """All completions of one prompt (`n` of them, sharing its prefill)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
