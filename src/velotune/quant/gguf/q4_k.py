"""Q4_K: super-blocks of 256 values, 8 sub-blocks of 32 with 6-bit scales and mins (144 bytes).

Layout: d fp16 | dmin fp16 | 12 B packed scales/mins | 128 B nibbles; value = d*sc*q - dmin*m.
Quantization follows ``quantize_row_q4_K_ref``: per sub-block weights rms(x) + |x|, the
``make_qkx2_quants`` search (21 candidates), 6-bit scales/mins against the super-block's maxima,
then every value re-rounded against the stored (fp16, 6-bit) scale and min.
Q5_K (q5_k.py) shares all of this except the 5-bit codes.
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import f16_bytes, f16_from_bytes, f16_round, fdiv, nearest_int, seq_sum
from velotune.quant.gguf._search import make_qkx2_quants

QK_K = 256


def pack_scales_mins(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(N, 8) 6-bit scales and mins -> (N, 12) uint8 (ggml's K_SCALE_SIZE packing)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)


def unpack_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) uint8 -> scales (N, 8), mins (N, 8) int32 (``get_scale_min_k4``)."""
    b = b.to(torch.int32)
    ls = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], dim=1)
    lm = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], dim=1)
    return ls, lm


def quantize_scale_min(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K pipeline. x: (N, 256) float32.

    Returns d, dmin (N,) float32 (pre-fp16), ls, lm (N, 8) int32 and codes L (N, 256) int32.
    """
    n = x.shape[0]
    xs = x.reshape(n * 8, 32).T.contiguous()  # (32, N*8) one sub-block per column
    # sqrtf(sum x^2 / 32): torch's vectorised float32 sqrt is not always correctly rounded (an ulp
    # here flips a candidate choice); the float64 root rounded to float32 is exactly sqrtf's
    av_x = torch.sqrt(fdiv(seq_sum(xs * xs), 32.0).to(torch.float64)).to(torch.float32)  # (N*8,)
    weights = av_x + xs.abs()
    scales, mins, levels = make_qkx2_quants(xs, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    levels = levels.T  # (N*8, 32)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = torch.clamp(scales.amax(dim=1), min=0.0)  # (N,)
    max_min = torch.clamp(mins.amax(dim=1), min=0.0)
    inv_scale = torch.where(max_scale > 0, fdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, fdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = torch.clamp(nearest_int(inv_scale[:, None] * scales) & 0xFF, max=63)  # (N, 8) uint8 semantics
    lm = torch.clamp(nearest_int(inv_min[:, None] * mins) & 0xFF, max=63)
    d = fdiv(max_scale, 63.0)
    dmin = fdiv(max_min, 63.0)
    dq = f16_round(d)[:, None] * ls.to(torch.float32)  # (N, 8)
    mq = f16_round(dmin)[:, None] * lm.to(torch.float32)
    nz = dq != 0
    safe = torch.where(nz, dq, torch.ones_like(dq))
    x3 = x.reshape(n, 8, 32)
    requant = torch.clamp(nearest_int((x3 + mq[:, :, None]) / safe[:, :, None]), 0, nmax)  # (N, 8, 32)
    levels = torch.where(nz[:, :, None], requant, levels.reshape(n, 8, 32)).reshape(n, QK_K)
    return d, dmin, ls, lm, levels


def dequantize_scale_min(b: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """value = (d*sc) * q - (dmin*m) for Q4_K/Q5_K; b: (N, >=16) block bytes, codes: (N, 256)."""
    n = b.shape[0]
    d, dmin = f16_from_bytes(b[:, 0:2]), f16_from_bytes(b[:, 2:4])
    ls, lm = unpack_scales_mins(b[:, 4:16])
    d1 = d[:, None] * ls.to(torch.float32)  # (N, 8)
    m1 = dmin[:, None] * lm.to(torch.float32)
    y = d1[:, :, None] * codes.reshape(n, 8, 32).to(torch.float32) - m1[:, :, None]
    return y.reshape(n, QK_K)


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 144) uint8."""
    n = x.shape[0]
    d, dmin, ls, lm, levels = quantize_scale_min(x, 15, -1.0, 20)
    lv = levels.reshape(n, 4, 2, 32)  # (N, chunk of 64, half, 32)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(n, 128).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_scales_mins(ls, lm), qs], dim=1)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    """(N, 144) uint8 -> (N, 256) float32."""
    n = b.shape[0]
    qs = b[:, 16:].to(torch.int32).reshape(n, 4, 1, 32)
    codes = torch.cat([qs & 0xF, qs >> 4], dim=2)  # (N, 4, 2, 32)
    return dequantize_scale_min(b, codes)
