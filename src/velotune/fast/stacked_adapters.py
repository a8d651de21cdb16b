"""Generation's copies of the LoRA adapters: per projection group, the A's stacked and the B's, in the
model's dtype, in persistent buffers that the no-grad forward reads as they are.

Why: the fused functions (lora_linear.adapter_inputs) stack a group's A's into one (R, in) matrix and
cast every adapter to the compute dtype on each call. Training needs that (the adapters change every
step and are autograd inputs), but in generation it repeats on every decode step, and a captured
CUDA graph replays it every step too: 4 groups x 32 layers = 128 cat + cast per 8B step, ~0.55 ms
of ~8.5 ms (H200 profile, BENCHMARKS.md session 10). The adapters do not change during a generate
call, so the engine stacks them once (`with_stacked_adapters`) into buffers it keeps with its KV
cache and graphs (inference/engine.py `_Resident`), and refreshes them in place at the start of
every generate call (`refresh_adapters`: `copy_` into the same storage, so captured graphs read
the new values). The refresh is unconditional: GRPO's optimizer writes the fp32 adapters in place
between calls, and `.data` writes leave no version counter to compare; one pass over the adapters
(85 M values at 8B, r=32) is small next to a generate call.

Memory: the buffers are the adapters once more in 16-bit (~170 MB at 8B, r=32, every projection),
kept as long as the engine keeps its cache and graphs (they must: the graphs read them) and given
back with them by `inference.release` (GRPO's sampler releases a cache that is large next to the
weights before the training step).

Training (autograd on) never reads these buffers: the callers use them only without autograd.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .lora_linear import GroupLayout, _split


@dataclass(frozen=True, eq=False)
class StackedAdapters:
    """One group's adapters in one flat buffer: A stacked (R, in) and each B (out_j, r_j) are views of it."""

    layout: GroupLayout  # which projections of the group have an adapter, their rows of `a`
    a: torch.Tensor  # (R, in): [A_0; A_1; ...] in the buffer's dtype
    bs: tuple[torch.Tensor, ...]  # (out_j, r_j) per projection with an adapter
    sources: tuple[torch.Tensor, ...]  # the adapters themselves (A_0, .., A_k, B_0, .., B_k), the refresh's source

    def views(self) -> list[torch.Tensor]:
        """The buffer's views in the order of `sources` (each A_j is rows of `a`)."""
        return [self.a[rows] for rows in self.layout.rows] + list(self.bs)

    def refresh(self) -> None:
        """Copy the adapters' current values into the buffers (cast to their dtype), in place."""
        with torch.no_grad():
            for view, source in zip(self.views(), self.sources):
                view.copy_(source)


def stack_group(projections, dtype: torch.dtype) -> StackedAdapters | None:
    """The buffers of one group of `LoraProjection`s (q/k/v, o, gate/up or down) in `dtype`, filled with
    the adapters' values; None when no projection of the group has an adapter."""
    with_adapter = tuple(i for i, p in enumerate(projections) if p.lora_A is not None)
    if not with_adapter:
        return None
    As = [projections[i].lora_A for i in with_adapter]  # (r_j, in)
    Bs = [projections[i].lora_B for i in with_adapter]  # (out_j, r_j)
    rows, start = [], 0
    for A in As:
        rows.append(slice(start, start + A.shape[0]))
        start += A.shape[0]
    shapes = [(start, As[0].shape[1]), *(tuple(B.shape) for B in Bs)]
    flat = torch.empty(sum(s[0] * s[1] for s in shapes), dtype=dtype, device=As[0].device)
    a, *bs = _split(flat, shapes)  # views of flat: (R, in), [(out_j, r_j)]
    layout = GroupLayout(with_adapter, tuple(rows), tuple(t.dtype for t in (*As, *Bs)))
    stacked = StackedAdapters(layout, a, tuple(bs), tuple((*As, *Bs)))
    stacked.refresh()
    return stacked


@dataclass(frozen=True, eq=False)
class LayerAdapters:
    """One decoder layer's stacked adapters, by the groups the fused functions run (None: no adapter there)."""

    qkv: StackedAdapters | None
    o: StackedAdapters | None
    gate_up: StackedAdapters | None
    down: StackedAdapters | None

    def groups(self) -> tuple[StackedAdapters | None, ...]:
        return self.qkv, self.o, self.gate_up, self.down


def with_stacked_adapters(plan, dtype: torch.dtype):
    """`plan` (a fast StepPlan for no-grad calls) whose layers carry their adapters stacked in `dtype`
    (LayerPlan.adapters); `plan` itself when it is not fast, is resolved per layer (sharded weights), or
    no layer has an adapter."""
    if not plan.fast or plan.per_layer or not plan.layers:
        return plan
    layers, any_adapter = [], False
    for layer in plan.layers:
        groups = LayerAdapters(stack_group(layer.qkv, dtype), stack_group(layer.o, dtype),
                               stack_group(layer.mlp[:2], dtype), stack_group(layer.mlp[2:], dtype))
        any_adapter = any_adapter or any(g is not None for g in groups.groups())
        layers.append(dataclasses.replace(layer, adapters=groups))
    return dataclasses.replace(plan, layers=tuple(layers)) if any_adapter else plan


def refresh_adapters(plan) -> int:
    """Refresh every stacked group of `plan` from its adapters (see the module docstring); returns how many."""
    count = 0
    for layer in plan.layers if plan.fast else ():
        for group in layer.adapters.groups() if layer.adapters is not None else ():
            if group is not None:
                group.refresh()
                count += 1
    return count

