"""Group-relative advantages from the reward functions' scores (TRL 1.16's aggregation and scaling).

Each prompt's num_generations completions form a group; a completion's advantage is its total
reward minus its group's mean, divided by a std (scale_rewards: "group" = the group's, "batch" = the
whole batch's, "none" = not divided; Dr. GRPO recommends "none"). NaN scores (a function returned
None/NaN) are left out of every mean and std; a completion no function could score gets advantage 0.
"""

from __future__ import annotations

import torch


def nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaN (torch has nanmean, not nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt()
    if dim is None:
        return std.reshape(())
    return std if keepdim else std.squeeze(dim)


def group_advantages(scores: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     aggregation: str = "sum_then_normalize") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (N, F) per completion and reward function (NaN = no score), weights (F,), N = groups x G.
    Returns (advantages (N,), total rewards (N,), zero_std (N,) bool: the group's rewards were all equal)."""
    N, F = scores.shape
    if N % num_generations:
        raise ValueError(f"{N} completions do not split into groups of num_generations={num_generations}")
    unscorable = torch.isnan(scores).all(dim=1)  # (N,)
    if aggregation == "sum_then_normalize":
        rewards = (scores * weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan
        groups = rewards.view(-1, num_generations)  # (N / G, G)
        mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
        if scale_rewards in ("group", "none"):
            std = nanstd(groups, dim=1).repeat_interleave(num_generations)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if N > 1 else torch.zeros_like(rewards)
        else:
            raise ValueError(f"scale_rewards={scale_rewards!r}: 'group', 'batch' or 'none'")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = scores.view(-1, num_generations, F)  # (N / G, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view(N, F) * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if N > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
        rewards = (scores * weights.unsqueeze(0)).nansum(dim=1)  # the logged total stays in reward units
        rewards[unscorable] = torch.nan
    else:
        raise ValueError(f"multi_objective_aggregation={aggregation!r}: 'sum_then_normalize' or 'normalize_then_sum'")
    advantages = torch.nan_to_num(advantages, nan=0.0)
    advantages[unscorable] = 0.0
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return advantages, rewards, zero_std
