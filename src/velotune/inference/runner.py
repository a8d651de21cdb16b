"""Our decoder's forward over the static cache: prefill and one decode step, eager or as CUDA graphs.

The layers are the model's own modules, called as `DecoderModel.forward` calls them (embedding,
rotary tables per layer kind, each `DecoderLayer`, final norm, lm_head), so PEFT's LoRA layers
inside them run unmerged with the adapters as they are at that moment, 4-bit layers run through
their own module, and nothing is copied. What differs from the training forward: the cache is
a `CacheStep` over preallocated buffers and the masks are built here from per-slot validity, on
the device, without a host sync, so a decode step is capturable as a CUDA graph.

A decode step always attends over the cache's whole length (masked past the current slot): one
shape for every step, which is what lets one graph per batch-size bucket serve the whole loop.
"""

from __future__ import annotations

import torch

from ..fast.plan import StepPlan, plan_step
from .cache import CacheStep, StaticKVCache


class FixedMasks:
    """The `LayerMasks` interface our Attention uses (`for_keys`), with the mask already built."""

    def __init__(self, mask: torch.Tensor | None, causal: bool):
        self.mask, self.causal = mask, causal

    def for_keys(self, k_len: int):
        return self.mask, self.causal


def step_mask(valid: torch.Tensor, q_slots: torch.Tensor, visible: int, window: int | None) -> torch.Tensor:
    """valid (b, L) bool (slot holds a real token), q_slots (T,) -> bool (b, 1, T, visible).

    A query sees keys at slots <= its own that hold real tokens (and within the window); a query
    that sees none (a padding slot) sees all, as models/masks.py does, so no NaN appears."""
    k = torch.arange(visible, device=valid.device)  # (Kv,)
    allowed = k[None, :] <= q_slots[:, None]  # (T, Kv)
    if window is not None:
        allowed = allowed & (q_slots[:, None] - k[None, :] < window)
    mask = allowed[None, None] & valid[:, None, None, :visible]  # (b, 1, T, Kv)
    return mask | ~mask.any(-1, keepdim=True)


class DecoderRunner:
    """Forward passes of one causal LM (ours) over a StaticKVCache."""

    def __init__(self, causal, decoder, plan: StepPlan | None = None):
        """`plan`: the fast path's plan for these calls (default: `plan_step` for a cached, no-grad
        evaluation call: fused kernels and LoRA on CUDA, the plain path elsewhere)."""
        self.causal, self.decoder = causal, decoder
        self.plan = plan if plan is not None else plan_step(decoder, cache=True)
        self.windows = {kind: decoder.config.sliding_window if kind == "sliding_attention" else None
                        for kind in decoder.rotary_emb}
        self.softcap = getattr(causal.config, "final_logit_softcapping", None)

    def kv_shapes(self) -> list[tuple[int, int]]:
        return [(layer.self_attn.num_key_value_heads, layer.self_attn.head_dim) for layer in self.decoder.layers]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, step: CacheStep,
                masks: dict[str, FixedMasks], embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions (b, T) (or (3, b, T) for M-RoPE) -> logits (b, V) of the last position, fp32.
        `embeds` (b, T, C): input embeddings to use instead of the ids' (a vision model's prefill)."""
        decoder = self.decoder
        h = decoder.embed(ids) if embeds is None else embeds  # (b, T, C)
        cos_sin = {kind: rope(h, positions) for kind, rope in decoder.rotary_emb.items()}
        for layer, kind in zip(decoder.layers, decoder.layer_types):
            h = layer(h, cos_sin[kind], masks[kind], step, self.plan)
        h = decoder.norm(h[:, -1:], self.plan)  # (b, 1, C)
        logits = self.causal.lm_head(h)[:, 0].float()  # (b, V)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def prefill(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                row_start: int, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Left-padded prompts ids (b, P) into cache rows [row_start, row_start + b), slots [0, P) -> logits (b, V)."""
        b, P = ids.shape
        slots = torch.arange(P, device=ids.device)
        padded = not bool(valid.all())
        masks = {}
        for kind, window in self.windows.items():
            if not padded and (window is None or P <= window):
                masks[kind] = FixedMasks(None, True)  # plain causal: flash / cuDNN kernels stay eligible
            else:
                masks[kind] = FixedMasks(step_mask(valid, slots, P, window), False)
        return self.forward(ids, positions, CacheStep(cache, b, slots, P, row_start), masks, embeds)

    def decode(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        """One token per row: ids, positions (b, 1), slot (1,) on the device -> logits (b, V). No host sync."""
        b = ids.shape[0]
        L = cache.length
        masks = {kind: FixedMasks(step_mask(valid[:b], slot, L, window), False) for kind, window in self.windows.items()}
        return self.forward(ids, positions, CacheStep(cache, b, slot, L), masks)


class DecodeGraphs:
    """Decode steps of one runner and cache, as CUDA graphs per batch size, on static input buffers.

    `run(b)` reads ids/positions rows [0, b), `slot` and `valid`; callers fill those first. The
    graphs of all batch sizes share one memory pool (they never run at once)."""

    def __init__(self, runner: DecoderRunner, cache: StaticKVCache, valid: torch.Tensor, use_graphs: bool):
        device = valid.device
        rows = cache.rows
        self.runner, self.cache, self.valid = runner, cache, valid
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.use_graphs = use_graphs and device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _eager(self, b: int) -> torch.Tensor:
        return self.runner.decode(self.cache, self.ids[:b], self.positions[:b], self.slot, self.valid)

    def run(self, b: int) -> torch.Tensor:
        """logits (b, V) of one decode step of rows [0, b)."""
        if not self.use_graphs:
            return self._eager(b)
        if b not in self._graphs:
            self._capture(b)
        graph, out = self._graphs[b]
        graph.replay()
        return out

    def _capture(self, b: int) -> None:
        # Warm-up on a side stream (lazy initialisations, cuBLAS workspaces), then capture. The
        # warm-up writes this step's K/V at the current slot, which the captured step rewrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._eager(b)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager(b)
        self._graphs[b] = (graph, out)
