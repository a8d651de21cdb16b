"""Q2_K: super-blocks of 256 values, 16 sub-blocks of 16 with 4-bit scales and mins (84 bytes).

Layout: 16 B scales (low nibble scale, high nibble min) | 64 B 2-bit codes (as Q3_K's low bits)
| d fp16 | dmin fp16; value = d*sc*q - dmin*m. Quantization follows ``quantize_row_q2_K_ref``:
``make_qkx2_quants`` per sub-block with weights |x| and absolute error (16 candidates), 4-bit
scales/mins against the super-block's maxima, then re-rounding.
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import f16_bytes, f16_from_bytes, f16_round, fdiv, nearest_int
from velotune.quant.gguf._search import make_qkx2_quants
from velotune.quant.gguf.q3_k import pack_2bit, unpack_2bit


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 84) uint8."""
    n = x.shape[0]
    xs = x.reshape(n * 16, 16).T.contiguous()  # (16, N*16) one sub-block per column
    scales, mins, levels = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    levels = levels.T  # (N*16, 16)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale = torch.clamp(scales.amax(dim=1), min=0.0)  # (N,)
    max_min = torch.clamp(mins.amax(dim=1), min=0.0)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = nearest_int(fdiv(15.0, torch.where(has_s, max_scale, 1.0))[:, None] * scales)
    ls = torch.where(has_s[:, None], ls, torch.zeros_like(ls))
    lm = nearest_int(fdiv(15.0, torch.where(has_m, max_min, 1.0))[:, None] * mins)
    packed = torch.where(has_m[:, None], (ls | (lm << 4)) & 0xFF, ls & 0xFF)  # (N, 16) uint8 semantics
    d = torch.where(has_s, fdiv(max_scale, 15.0), 0.0)
    dmin = torch.where(has_m, fdiv(max_min, 15.0), 0.0)
    dq = f16_round(d)[:, None] * (packed & 0xF).to(torch.float32)  # (N, 16)
    mq = f16_round(dmin)[:, None] * (packed >> 4).to(torch.float32)
    nz = dq != 0
    x3 = x.reshape(n, 16, 16)
    requant = torch.clamp(nearest_int((x3 + mq[:, :, None]) / torch.where(nz, dq, 1.0)[:, :, None]), 0, 3)
    levels = torch.where(nz[:, :, None], requant, levels.reshape(n, 16, 16)).reshape(n, 256)
    return torch.cat([packed.to(torch.uint8), pack_2bit(levels), f16_bytes(d), f16_bytes(dmin)], dim=1)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    """(N, 84) uint8 -> (N, 256) float32."""
    n = b.shape[0]
    sc = b[:, :16].to(torch.int32)
    d, dmin = f16_from_bytes(b[:, 80:82]), f16_from_bytes(b[:, 82:84])
    dl = d[:, None] * (sc & 0xF).to(torch.float32)  # (N, 16)
    ml = dmin[:, None] * (sc >> 4).to(torch.float32)
    codes = unpack_2bit(b[:, 16:80]).reshape(n, 16, 16).to(torch.float32)
    return (dl[:, :, None] * codes - ml[:, :, None]).reshape(n, 256)
