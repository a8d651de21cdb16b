"""A preallocated KV cache, and the per-forward view of it our Attention talks to.

Why static: transformers' DynamicCache concatenates every step (a new allocation and a copy of
the whole cache per layer and token) and changes shape each step, which rules out CUDA graphs.
Here each layer owns two buffers (rows, Hkv, L, D) allocated once; slot j of a row holds the
token at padded position j (prompts are left-padded to one length, then every row writes its
next token at the same slot). `CacheStep` is what one forward pass sees: it implements the
`update(k, v, layer_idx) -> (keys, values)` contract of transformers' `Cache` that
`models.layers.Attention` already calls, writing at the step's slots and returning the first
`visible` slots; which of those a query may see is the mask's business (engine masks).

8-bit option (the docs' `float8_kv_cache=True`): K/V are stored as float8 e4m3 (scale 1,
saturated at +-448, as vLLM's uncalibrated fp8 cache) and widened to the compute dtype when
read; it halves the cache's memory, not its read time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.decode_attention import decode_attention, supported

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GIB = 1024 ** 3


@dataclass(frozen=True)
class InferenceSettings:
    """from_pretrained's inference arguments (the docs pass them for vLLM): kept on the model."""

    fast_inference: bool = False
    gpu_memory_utilization: float = 0.5
    max_lora_rank: int = 64
    float8_kv_cache: bool = False

    def __post_init__(self):
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization={u!r}: must be in (0, 1] (the share of GPU memory "
                             "generation may use)")
        r = self.max_lora_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"max_lora_rank={r!r}: must be a positive integer (the largest LoRA rank "
                             "load_lora accepts)")


class StaticKVCache:
    """Per-layer K/V buffers (rows, Hkv, length, D) in `dtype` (or float8 stored as bytes)."""

    def __init__(self, shapes: list[tuple[int, int]], rows: int, length: int, dtype: torch.dtype,
                 device: torch.device, fp8: bool = False, memory_fraction: float = 1.0):
        """shapes: (Hkv, D) per layer. Raises MemoryError naming the settings to lower when the
        buffers do not fit (on CUDA: in `memory_fraction` of the GPU, what is already used counted)."""
        self.rows, self.length, self.dtype, self.fp8 = rows, length, dtype, fp8
        store = torch.uint8 if fp8 else dtype
        elem = 1 if fp8 else torch.empty((), dtype=dtype).element_size()
        need = sum(2 * rows * h * length * d * elem for h, d in shapes)
        self.nbytes = need
        _check_fits(need, rows, length, device, memory_fraction, fp8)
        try:
            self.k = [torch.zeros(rows, h, length, d, dtype=store, device=device) for h, d in shapes]
            self.v = [torch.zeros(rows, h, length, d, dtype=store, device=device) for h, d in shapes]
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if "memory" not in str(error).lower():
                raise
            raise MemoryError(_advice(need, rows, length, fp8, f"allocation failed: {str(error).splitlines()[0]}")) \
                from error

    def fits(self, rows: int, length: int, dtype: torch.dtype, fp8: bool) -> bool:
        return rows <= self.rows and length <= self.length and dtype == self.dtype and fp8 == self.fp8

    def read(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer.view(FP8).to(self.dtype) if self.fp8 else buffer

    def store(self, values: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return values.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        return values.to(self.dtype)

    def gather_rows(self, order: torch.Tensor) -> None:
        """Rows `order` (m,) move to rows 0..m-1 of every buffer (finished sequences dropped), one layer at a time."""
        m = order.shape[0]
        for buffers in (self.k, self.v):
            for buf in buffers:
                buf[:m].copy_(buf.index_select(0, order))


class CacheStep:
    """The cache as one forward sees it: rows [0, rows), writes at `slots` (T,), returns `visible` slots."""

    def __init__(self, cache: StaticKVCache, rows: int, slots: torch.Tensor, visible: int, row_start: int = 0):
        self.cache, self.slots, self.visible = cache, slots, visible
        self.row_range = slice(row_start, row_start + rows)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v (b, Hkv, T, D) -> keys, values (b, Hkv, visible, D) including the new ones."""
        out = []
        for buffers, new in ((self.cache.k, k), (self.cache.v, v)):
            buf = buffers[layer_idx][self.row_range]  # (b, Hkv, L, D)
            buf.index_copy_(2, self.slots, self.cache.store(new))
            out.append(self.cache.read(buf[:, :, :self.visible]))
        return out[0], out[1]

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                         mask: torch.Tensor | None, scaling: float, cos_sin=None) -> torch.Tensor | None:
        """A decode step's RoPE (with `cos_sin`), `update` and attention in one kernel
        (kernels/decode_attention.py): q (b, H, 1, D), k/v (b, Hkv, 1, D) as projected, mask
        (b, 1, 1, L) -> (b, H, 1, D); None, with nothing changed, when the kernel does not take this
        step (8-bit cache, a prefill, a long cache, no Triton): the caller then rotates, runs
        `update` and its own attention."""
        if (self.cache.fp8 or mask is None or self.slots.shape[0] != 1 or self.row_range.start != 0
                or self.visible != self.cache.length):
            return None
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if not supported(q, k_cache):
            return None
        return decode_attention(q, k, v, k_cache, v_cache, mask, self.slots, scaling, cos_sin)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible


def _advice(need: int, rows: int, length: int, fp8: bool, why: str) -> str:
    lower = "lower max_tokens, n or the number of prompts per call"
    if not fp8:
        lower += ", or load with float8_kv_cache=True (half the cache memory)"
    return (f"the KV cache for {rows} sequences of {length} tokens needs {need / GIB:.2f} GiB; {why}. "
            f"To fit: {lower}, or raise gpu_memory_utilization (from_pretrained) if the GPU has room")


def _check_fits(need: int, rows: int, length: int, device: torch.device, fraction: float, fp8: bool) -> None:
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    allowed = fraction * total - used
    if need > allowed:
        raise MemoryError(_advice(need, rows, length, fp8,
                                  f"gpu_memory_utilization={fraction} allows {max(allowed, 0) / GIB:.2f} GiB more "
                                  f"({used / GIB:.1f} of {total / GIB:.1f} GiB already in use)"))
