"""Sampling filters on fixed logits, with enough seeded draws to catch a wrong filter; SamplingParams' checks."""

from __future__ import annotations

import math

import pytest
import torch

from velotune.inference import SamplingParams
from velotune.inference.sampling import chosen_logprobs, filter_logits, sample

DRAWS = 40_000
# Probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 (as logits), in shuffled token order.
PROBS = torch.tensor([0.1, 0.4, 0.04, 0.25, 0.06, 0.15])
LOGITS = PROBS.log()


def _frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = sample(logits.expand(DRAWS, -1).clone(), params, gen)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / DRAWS


def _expected(keep: list[int], temperature: float = 1.0) -> torch.Tensor:
    p = torch.zeros_like(PROBS)
    p[keep] = PROBS[keep] ** (1 / temperature)
    return p / p.sum()


def _close(freq, expected):
    # 4 standard deviations of a binomial proportion at 40k draws is at most 0.01
    assert torch.allclose(freq, expected, atol=0.01), f"frequencies {freq.tolist()} vs expected {expected.tolist()}"


def test_plain_sampling_follows_the_distribution():
    _close(_frequencies(SamplingParams(temperature=1.0)), PROBS)


def test_temperature():
    _close(_frequencies(SamplingParams(temperature=0.5)), _expected(list(range(6)), 0.5))


def test_top_k_keeps_the_k_most_likely():
    _close(_frequencies(SamplingParams(top_k=2)), _expected([1, 3]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.25 = 0.65 < 0.7, so 0.15 joins: {1, 3, 5}
    _close(_frequencies(SamplingParams(top_p=0.7)), _expected([1, 3, 5]))
    # 0.4 + 0.25 reaches 0.65: the set stops there
    _close(_frequencies(SamplingParams(top_p=0.65 - 1e-4)), _expected([1, 3]))


def test_min_p_drops_tokens_below_a_share_of_the_best():
    # floor 0.3 * 0.4 = 0.12: keeps 0.4, 0.25, 0.15
    _close(_frequencies(SamplingParams(min_p=0.3)), _expected([1, 3, 5]))


def test_filters_compose_in_order():
    # temperature 2 flattens first; top_k=3 then keeps tokens 1, 3, 5 (order unchanged by temperature)
    _close(_frequencies(SamplingParams(temperature=2.0, top_k=3)), _expected([1, 3, 5], 2.0))


def test_greedy_and_repetition_penalty():
    logits = LOGITS[None].clone()
    assert sample(logits, SamplingParams(temperature=0), None).item() == 1
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, 1] = True  # the best token was seen: its logit log(0.4) < 0 is multiplied by the penalty
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), None, seen=seen).item() == 3


def test_seed_reproduces():
    params = SamplingParams(temperature=1.0, seed=5)
    a = sample(LOGITS.expand(100, -1).clone(), params, torch.Generator().manual_seed(5))
    b = sample(LOGITS.expand(100, -1).clone(), params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(3, 10)
    tokens = torch.tensor([1, 5, 9])
    expected = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(chosen_logprobs(logits, tokens), expected)
    filtered = filter_logits(logits, SamplingParams(top_k=1))
    assert int((filtered > -math.inf).sum()) == 3


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
    ("min_p", 1.1), ("top_k", -2), ("repetition_penalty", 0.0), ("seed", "x"), ("logprobs", -1),
])
def test_bad_settings_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
