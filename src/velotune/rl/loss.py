"""GRPO's clipped surrogate loss, with TRL's loss types and normalizations (TRL 1.16 `GRPOTrainer._compute_loss`).

Per token t of completion i (advantage A_i, ratio r = exp(logp - logp_old)):
    loss_it = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
    KL_it   = exp(ref - logp) - (ref - logp) - 1          (k3 estimator, >= 0)
With importance_sampling_level="sequence" (GSPO) r is one number per completion: the exponential of
the masked mean log-ratio. The loss types differ only in how token losses are averaged:
    grpo     mean over each completion's tokens, then over completions (length-biased)
    bnpo     mean over the micro-batch's tokens
    dr_grpo  sum / (completions x max_completion_length)   (a constant: no length bias)
    dapo     sum / tokens of the whole generation batch (so accumulation steps add up to one mean)
grpo/bnpo/dr_grpo are divided by the accumulation steps here; dapo's normalizer already spans them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    importance_sampling_level: str = "token"
    delta: float | None = None  # two-sided clipping (INTELLECT-2): caps r * A from above for A < 0
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None  # dr_grpo's constant
    gradient_accumulation_steps: int = 1
    steps_per_generation: int = 1
    num_processes: int = 1


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, scaled for gradient accumulation
    policy_loss: torch.Tensor  # scalar, before that scaling (what TRL logs as the loss of the micro-batch)
    ratio: torch.Tensor  # (B, T) or (B, 1): r
    per_token_kl: torch.Tensor | None  # (B, T) when beta > 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask's tokens; x (B, T) or (B, 1) (one value per completion: a mean over completions)."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,  # (B, T) fp32, with grad: this policy's log-probabilities of the completion tokens
    old_logps: torch.Tensor | None,  # (B, T) at generation time; None = logps.detach() (one update per batch)
    advantages: torch.Tensor,  # (B,) or (B, T)
    mask: torch.Tensor,  # (B, T) 1 for completion tokens that count
    settings: LossSettings,
    ref_logps: torch.Tensor | None = None,  # (B, T) of the adapter-disabled model; needed when beta > 0
    num_items_in_batch: torch.Tensor | float | None = None,  # dapo: completion tokens in the generation batch
) -> LossOutput:
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    A = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    log_ratio = logps - old  # (B, T)
    if settings.importance_sampling_level == "token":
        log_w = log_ratio
    elif settings.importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    else:
        raise ValueError(f"importance_sampling_level={settings.importance_sampling_level!r}: 'token' or 'sequence'")
    ratio = torch.exp(log_w)
    kl = None
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities (ref_logps)")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # (B, T)
        if settings.use_bias_correction_kl:
            kl = kl * ratio
    clipped = torch.clamp(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    unclipped = ratio if settings.delta is None else torch.clamp(ratio, max=settings.delta)
    per_token = -torch.min(unclipped * A, clipped * A)  # (B, T) or (B, 1)
    if kl is not None:
        per_token = per_token + settings.beta * kl  # broadcasts a sequence-level term to (B, T)
    accumulation = settings.gradient_accumulation_steps
    kind = settings.loss_type
    if kind == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        policy = loss.detach()
        loss = loss / accumulation
    elif kind == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        policy = loss.detach()
        loss = loss / accumulation
    elif kind == "dr_grpo":
        if settings.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normalizing constant)")
        loss = (per_token * mask).sum() / (per_token.size(0) * settings.max_completion_length)
        policy = loss.detach()
        loss = loss / accumulation
    elif kind == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' needs num_items_in_batch (completion tokens of the generation batch)")
        items = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device).clamp(min=1.0)
        normalizer = items / settings.num_processes * accumulation / settings.steps_per_generation
        loss = (per_token * mask).sum() / normalizer
        policy = loss.detach()
    else:
        raise ValueError(f"loss_type={kind!r}: velotune supports 'grpo', 'dr_grpo', 'dapo', 'bnpo'")
    return LossOutput(loss=loss, policy_loss=policy, ratio=ratio, per_token_kl=kl)


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, settings: LossSettings) -> dict:
    """The share of tokens whose ratio was clipped below / above / either (TRL's clip_ratio/* metrics)."""
    A = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    low = ((ratio < 1 - settings.epsilon_low) & (A < 0)).float()
    high = ((ratio > 1 + settings.epsilon_high) & (A > 0)).float()
    mask = mask.float()
    return {"clip_ratio/low_mean": masked_mean(low, mask).item(),
            "clip_ratio/high_mean": masked_mean(high, mask).item(),
            "clip_ratio/region_mean": masked_mean(((low + high) > 0).float(), mask).item()}
