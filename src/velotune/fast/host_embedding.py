"""A frozen input embedding waits in pinned host memory while the model trains on a GPU.

Why: an untied, frozen `embed_tokens` is the largest 16-bit tensor of a QLoRA model that no GEMM reads.
Llama-3.1-8B's (128256, 4096) table is 0.98 GiB of a 7.7 GiB QLoRA step, Llama-3.2-11B-Vision's (128264, 4096) the
same of a 9.9 GiB one (BENCHMARKS.md). A training call reads only its B * T rows, in the forward alone (no gradient
flows into a frozen table), so the table can sit in host memory: the rows are gathered there and copied in, as they
are (B * T * C * 2 bytes: 32 MiB for 2 x 2,048 tokens at 4,096 hidden). The price is that reading the token ids on
the host waits once per call for the GPU to reach that point.

When (plan.py's `StepPlan.host_embedding`): a training call with autograd on CUDA, `embed_tokens` a plain
nn.Embedding whose weight is frozen, at least MIN_BYTES, and not the lm_head's weight (a tied head reads all of it in
every loss GEMM); no process group (DDP and FSDP expect a module's weights on one device); the model's runtime setting
and VELOTUNE_HOST_EMBEDDING on. The generation engine turns the setting off and brings the table back: its decode
graphs read the table in place, one token a row, where a host round trip every step would cost more than it saves.
An embedding found on the host with a trainable weight also goes back before its lookup.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BYTES = 64 * 2**20  # below this the saving is small beside a step's activations


def offloadable(embedding: nn.Module, head: nn.Module | None) -> str | None:
    """Why `embedding` (our decoder's `embed_tokens`) must stay where the layers are, or None; `head`: the model's
    lm_head (None when the caller runs the decoder alone)."""
    if type(embedding) is not nn.Embedding:
        return f"embed_tokens is a {type(embedding).__name__} (an adapter or a trained copy), not a plain Embedding"
    weight = embedding.weight
    if weight.requires_grad:
        return "embed_tokens trains"
    if weight.numel() * weight.element_size() < MIN_BYTES:
        return f"embed_tokens is under {MIN_BYTES // 2**20} MiB"
    if head is None:
        return "the decoder runs without its lm_head, which may share the weight"
    if any(p is weight for p in head.parameters()):
        return "lm_head shares embed_tokens' weight (tied)"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "a process group is active (DDP/FSDP expect a module's weights on one device)"
    return None


def to_host(embedding: nn.Embedding) -> None:
    """Move the table into pinned host memory (the device copy is freed once nothing else holds it)."""
    weight = embedding.weight
    host = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    host.copy_(weight.detach())
    weight.data = host


def to_device(embedding: nn.Embedding, device: torch.device) -> None:
    """Bring a host table back to `device`."""
    if embedding.weight.device != device:
        embedding.weight.data = embedding.weight.data.to(device)


def keep_on_device(decoder) -> None:
    """The generation engine's claim: `decoder`'s table back on the layers' device, and no later training call moves
    it out again (a GRPO step generates and trains in turn: a move each way per step would cost more than it saves)."""
    decoder.runtime.host_embedding = False
    to_device(decoder.embed_tokens, decoder.compute_device)


def is_on_host(embedding: nn.Module, device: torch.device) -> bool:
    """`embedding`'s table is in host memory while the layers run on `device` (another device)."""
    weight = getattr(embedding, "weight", None)
    return weight is not None and weight.device.type == "cpu" and device.type != "cpu"


def host_lookup(weight: torch.Tensor, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows of the host table `weight` (V, C) for `input_ids` (...) on any device -> (..., C) on `device`.

    The rows are gathered into pinned memory (torch's caching host allocator keeps the block until the copy that reads
    it has run) and copied without blocking the host; the same values as `F.embedding` (padding_idx only changes the
    gradient, and this table has none)."""
    ids = input_ids.to("cpu").reshape(-1)  # (N,): waits for the GPU when the ids were made there
    rows = torch.empty(ids.numel(), weight.shape[1], dtype=weight.dtype,
                       pin_memory=device.type == "cuda")  # (N, C)
    torch.index_select(weight, 0, ids, out=rows)
    return rows.to(device, non_blocking=True).view(*input_ids.shape, weight.shape[1])  # (..., C)
