"""One decode step's attention for a few rows, with the new key/value written into the cache.

Why: at batch 1 an 8B decode step spends about 0.9 ms of its 5.7 ms in small kernels, among them
per layer two cache writes (index_copy_, ~2.4 us each) and SDPA with a mask (~8 us) for a single
query over a few hundred cached slots (BENCHMARKS.md profile). Here a decode step's attention is
two launches: the first writes k and v at the step's slot and has a program per (row, query head,
split of 64 cache slots) run an online softmax over its slots (the slot being written is read from
the new k/v in registers, so no ordering between the store and the loads is needed); the second
combines each head's splits. Splitting the cache keeps hundreds of programs reading it at once (a
program per head walking the whole cache took 13 us at 384 slots, latency-bound). Given the step's
cos/sin the first kernel also applies the rotary embedding to q and the new k (two RoPE launches
per layer less). The mask is the engine's per-slot visibility (b, 1, 1, L) bool (validity,
causality and any sliding window already applied).

Scope: one query token per row, a cache in the compute dtype (not the 8-bit option), no
logit soft-capping (Gemma 2 keeps SDPA's explicit path), grouped-query heads, up to MAX_LENGTH slots. No autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl
from .rope import rope_reference

MAX_LENGTH = 8192  # longer caches keep SDPA (the splits' partial sums grow with the length)
_BLOCK_L = 64
_CHUNK = 64  # cache slots per program (split): the cache is read by many programs at once


@jit
def _rotated(X, d, d_ok, cos, sin, sign, partner):
    """x * cos + rotate_half(x) * sin of one head vector X[d] (the first R features; the rest pass)."""
    x = tl.load(X + d, mask=d_ok, other=0.0).to(tl.float32)
    x_partner = tl.load(X + partner, mask=d_ok, other=0.0).to(tl.float32)
    return x * cos + x_partner * (sign * sin)


@jit
def _decode_attention_kernel(
    Q, K_NEW, V_NEW, K_CACHE, V_CACHE, MASK, SLOT,  # Q (B, H, D); K/V_NEW (B, Hkv, D); caches (rows, Hkv, L, D)
    PART_M, PART_L, PART_ACC,  # per (row, head, split): running max, sum, (DP,) weighted values, fp32
    COS, SIN, cos_stride, sin_stride, R,  # ROPE: COS/SIN (B|1, 1, R) (row stride 0 when shared), R rotated dims
    L, scaling, CHUNK,  # MASK (B, L) bool as uint8; SLOT (1,) int64; CHUNK slots per split (a BLOCK_L multiple)
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_L: tl.constexpr,
    ROPE: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = pid % SPLITS
    row = pid // (H * SPLITS)
    head = (pid // SPLITS) % H
    kv = head // (H // HKV)
    d = tl.arange(0, DP)
    d_ok = d < D
    slot = tl.load(SLOT)
    q_ptr = Q + (row * H + head) * D
    k_ptr = K_NEW + (row * HKV + kv) * D
    if ROPE:  # rotate q and the new k here (the step's position is in cos/sin), as kernels/rope.py does
        half = R // 2
        rotated = d < R
        cos = tl.load(COS + row * cos_stride + d, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(SIN + row * sin_stride + d, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, tl.where(rotated, 1.0, 0.0))  # rotate_half: (-x2, x1)
        partner = tl.where(d < half, d + half, tl.where(rotated, d - half, d))
        q = _rotated(q_ptr, d, d_ok, cos, sin, sign, partner).to(Q.dtype.element_ty)
        k_new = _rotated(k_ptr, d, d_ok, cos, sin, sign, partner).to(K_CACHE.dtype.element_ty)
    else:
        q = tl.load(q_ptr + d, mask=d_ok, other=0.0)
        k_new = tl.load(k_ptr + d, mask=d_ok, other=0.0)  # (DP,)
    q = q.to(tl.float32) * scaling  # (DP,)
    v_new = tl.load(V_NEW + (row * HKV + kv) * D + d, mask=d_ok, other=0.0)
    cache_base = (row * HKV + kv).to(tl.int64) * L * D
    if (head % (H // HKV) == 0) & (split == 0):  # one program per kv head writes the new key and value
        tl.store(K_CACHE + cache_base + slot * D + d, k_new, mask=d_ok)
        tl.store(V_CACHE + cache_base + slot * D + d, v_new, mask=d_ok)
    # Online softmax per lane (slot j is lane j % BLOCK_L), lanes combined at the end: no scalar
    # carried through the loop, and a lane that has seen nothing visible yet keeps m = -inf.
    offs = tl.arange(0, BLOCK_L)
    m_i = tl.full((BLOCK_L,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_L, DP), dtype=tl.float32)
    for start in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_L):
        j = start + offs  # (BL,) slots
        in_range = j < L
        ptrs = cache_base + j[:, None] * D + d[None, :]  # (BL, DP)
        load_ok = in_range[:, None] & d_ok[None, :]
        k = tl.load(K_CACHE + ptrs, mask=load_ok, other=0.0)
        v = tl.load(V_CACHE + ptrs, mask=load_ok, other=0.0)
        here = (j == slot)[:, None]
        k = tl.where(here, k_new[None, :], k).to(tl.float32)  # the slot being written: the new key
        v = tl.where(here, v_new[None, :], v).to(tl.float32)
        visible = tl.load(MASK + row * L + j, mask=in_range, other=0) != 0
        s = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BL,)
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # 0 where m_i = -inf
        p = tl.exp(s - m_safe)  # 0 where hidden
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    m = tl.max(m_i, axis=0)  # -inf when this split saw nothing visible
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(m_i - m_safe)  # (BL,)
    part = pid  # = (row * H + head) * SPLITS + split
    tl.store(PART_M + part, m)
    tl.store(PART_L + part, tl.sum(l_i * w, axis=0))
    tl.store(PART_ACC + part * DP + d, tl.sum(acc * w[:, None], axis=0))


@jit
def _combine_kernel(PART_M, PART_L, PART_ACC, OUT, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr):
    """One (row, head): the splits' partial softmax sums -> OUT (B, H, D) in OUT's dtype."""
    pid = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, DP)
    m = tl.load(PART_M + pid * SPLITS + s)  # (S,)
    top = tl.max(m, axis=0)  # finite: the current slot is always visible
    w = tl.exp(m - top)  # 0 for splits that saw nothing
    total = tl.sum(tl.load(PART_L + pid * SPLITS + s) * w, axis=0)
    acc = tl.load(PART_ACC + (pid * SPLITS + s)[:, None] * DP + d[None, :])  # (S, DP)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(OUT + pid * D + d, out.to(OUT.dtype.element_ty), mask=d < D)


def decode_attention_reference(q, k_new, v_new, k_cache, v_cache, mask, slot, scaling, cos_sin=None
                               ) -> torch.Tensor:  # fmt: skip
    """q (B, H, 1, D), k_new/v_new (B, Hkv, 1, D), caches (rows >= B, Hkv, L, D), mask (B, 1, 1, L) bool,
    slot (1,) long -> (B, H, 1, D); k_new/v_new are written at `slot` of cache rows [0, B) first.
    `cos_sin` (cos, sin), each (B|1, 1, R): q and k_new are rotated first (rope_reference)."""
    B = q.shape[0]
    if cos_sin is not None:
        q, k_new = rope_reference(q, *cos_sin), rope_reference(k_new, *cos_sin)
    k_cache[:B].index_copy_(2, slot, k_new)
    v_cache[:B].index_copy_(2, slot, v_new)
    return F.scaled_dot_product_attention(q, k_cache[:B], v_cache[:B], attn_mask=mask, scale=scaling, enable_gqa=True)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this step: one query per row, a cache of q's dtype, L <= MAX_LENGTH."""
    return (q.shape[2] == 1 and k_cache.dtype == q.dtype and k_cache.shape[2] <= MAX_LENGTH
            and q.shape[1] % k_cache.shape[1] == 0 and should_use_triton(q, None))


def decode_attention(q, k_new, v_new, k_cache, v_cache, mask, slot, scaling, cos_sin=None,
                     use_triton: bool | None = None) -> torch.Tensor:  # fmt: skip
    """The reference's result, one launch: attention of one query per row over the cache with the
    new key/value written at `slot`, q and k_new rotated first when `cos_sin` is given. Caches
    must be contiguous (the engine's StaticKVCache buffers)."""
    B, H, T, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if T != 1 or H % Hkv or mask.shape[-1] != L:
        raise ValueError(f"decode_attention: one query per row over the whole cache: q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}, mask {tuple(mask.shape)}")
    if not should_use_triton(q, use_triton) or k_cache.dtype != q.dtype:
        return decode_attention_reference(q, k_new, v_new, k_cache, v_cache, mask, slot, scaling, cos_sin)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_attention: the cache buffers must be contiguous (rows, Hkv, L, D)")
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    masks = mask.reshape(B, L).contiguous().view(torch.uint8)  # (B, L)
    DP = next_power_of_2(D)
    splits = next_power_of_2(-(-L // _CHUNK))  # a power of two (the combine's arange); trailing splits may be empty
    chunk = -(-L // (splits * _BLOCK_L)) * _BLOCK_L
    part_m = torch.empty(B * H * splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * H * splits, DP, dtype=torch.float32, device=q.device)
    if cos_sin is None:
        rope = (q, q, 0, 0, 0)  # placeholders
    else:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in cos_sin)  # (B|1, 1, R)
        rope = (cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0, sin.stride(0) if sin.shape[0] > 1 else 0,
                cos.shape[-1])
    kernel_for(_decode_attention_kernel)[(B * H * splits,)](
        q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_cache, v_cache, masks, slot, part_m, part_l, part_acc,
        *rope, L, float(scaling), chunk, H=H, HKV=Hkv, D=D, DP=DP, BLOCK_L=_BLOCK_L, ROPE=cos_sin is not None,
        SPLITS=splits, num_warps=4,
    )  # fmt: skip
    kernel_for(_combine_kernel)[(B * H,)](part_m, part_l, part_acc, out, D=D, DP=DP, SPLITS=splits, num_warps=4)
    return out
