"""Our GRPO loss equals TRL 1.16's own (`GRPOTrainer._compute_loss`, trl/trainer/grpo_trainer.py) on the same
tensors, value and gradient, for every loss type, both importance-sampling levels, beta 0 and > 0.

TRL's method is called unbound on a plain namespace holding exactly the attributes it reads, with its
log-probability pass replaced by the tensors under test: the loss arithmetic that runs is TRL's own.
"""

from __future__ import annotations

import functools
import types
from collections import defaultdict

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOTrainer as TRLGRPOTrainer

from velotune.rl.advantages import group_advantages
from velotune.rl.loss import LossSettings, clip_fractions, grpo_loss

B, T = 6, 7


@functools.lru_cache(maxsize=1)
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def tensors(seed: int, with_old: bool):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(B, T, generator=g)) if with_old else None
    ref = logps.detach() + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    for i, n in enumerate([7, 3, 5, 1, 6, 2]):
        mask[i, n:] = 0  # completions of different lengths
    advantages = torch.randn(B, generator=g)
    return logps, old, ref, mask, advantages


def trl_loss(logps, old, ref, mask, advantages, settings: LossSettings, num_items):
    args = types.SimpleNamespace(delta=settings.delta, use_bias_correction_kl=settings.use_bias_correction_kl,
                                 steps_per_generation=settings.steps_per_generation)
    entropies = torch.rand(B, T)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, aux_loss_enabled=False,
        importance_sampling_level=settings.importance_sampling_level, beta=settings.beta, args=args,
        loss_type=settings.loss_type, epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=torch.nn.Linear(1, 1).train(),
        current_gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_completion_length=settings.max_completion_length, accelerator=accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "num_items_in_batch": torch.tensor(float(num_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if settings.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = TRLGRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


CASES = [(loss_type, level, beta, with_old)
         for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo")
         for level in ("token", "sequence")
         for beta in (0.0, 0.04)
         for with_old in (False, True)]


@pytest.mark.parametrize("loss_type,level,beta,with_old", CASES)
def test_loss_and_gradient_equal_trl(loss_type, level, beta, with_old):
    settings = LossSettings(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                            importance_sampling_level=level, max_completion_length=T, gradient_accumulation_steps=2,
                            steps_per_generation=2)
    logps, old, ref, mask, advantages = tensors(0, with_old)
    num_items = 2 * mask.sum().item()  # the generation batch holds two micro-batches
    theirs, metrics = trl_loss(logps, old, ref, mask, advantages, settings, num_items)
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    ours = grpo_loss(logps, old, advantages, mask, settings, ref_logps=ref if beta else None,
                     num_items_in_batch=num_items)
    (grad_ours,) = torch.autograd.grad(ours.loss, logps)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-8)
    clips = clip_fractions(ours.ratio, advantages, mask, settings)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert clips[key] == pytest.approx(metrics[key][0], abs=1e-6)
    if with_old and level == "token":
        assert clips["clip_ratio/region_mean"] > 0  # the case exercises clipping


def test_delta_and_bias_corrected_kl_equal_trl():
    settings = LossSettings(loss_type="bnpo", beta=0.1, delta=1.1, use_bias_correction_kl=True)
    logps, old, ref, mask, advantages = tensors(1, True)
    theirs, _ = trl_loss(logps, old, ref, mask, advantages, settings, mask.sum().item())
    ours = grpo_loss(logps, old, advantages, mask, settings, ref_logps=ref)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-7)


def trl_advantages(scores, weights, G, scale):
    """TRL 1.16's sum_then_normalize block of _generate_and_score_completions (grpo_trainer.py, 'rewards_per_func'),
    with its own nanstd."""
    from trl.trainer.utils import nanstd

    rewards = (scores * weights.unsqueeze(0)).nansum(dim=1)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = (nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch"
           else nanstd(rewards).expand_as(rewards))
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale != "none" else advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(8, 3, generator=g)
    scores[1, 2] = float("nan")  # one function skipped one completion
    weights = torch.tensor([1.0, 0.5, 2.0])
    ours, rewards, _ = group_advantages(scores, weights, 4, scale)
    torch.testing.assert_close(ours, trl_advantages(scores, weights, 4, scale))


def test_unscorable_completion_gets_zero_advantage():
    scores = torch.tensor([[1.0], [float("nan")], [0.0], [2.0]])
    advantages, rewards, _ = group_advantages(scores, torch.ones(1), 4)
    assert advantages[1] == 0 and torch.isnan(rewards[1])
    assert torch.isfinite(advantages).all()
    assert advantages[3] > advantages[0] > advantages[2]
