"""Q3_K: super-blocks of 256 values, 16 sub-blocks of 16 with 6-bit signed scales (110 bytes).

Layout: 32 B hmask | 64 B low 2-bit codes | 12 B packed scales | d fp16;
value = d * (sc - 32) * (q - 4) with q = low | high << 2. Bit t of hmask byte m is the high bit
of value 32t + m; in 128-value half c, byte l of the low codes holds values 128c + 32k + l at
bits 2k. Quantization follows ``quantize_row_q3_K_ref`` (``make_q3_quants`` with coordinate
descent per sub-block, scales quantized against the largest, then re-rounding).
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import (
    f16_bytes,
    f16_from_bytes,
    f16_round,
    fdiv,
    first_absmax,
    nearest_int,
    pack_bits,
    unpack_bits,
)
from velotune.quant.gguf._search import make_q3_quants

QK_K = 256


def pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """(N, 256) codes 0..3 -> (N, 64) uint8: byte 32c + l = sum_k code[128c + 32k + l] << 2k."""
    n = levels.shape[0]
    lv = levels.reshape(n, 2, 4, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)).reshape(n, 64).to(torch.uint8)


def unpack_2bit(b: torch.Tensor) -> torch.Tensor:
    """(N, 64) uint8 -> (N, 256) int32 codes, the inverse of ``pack_2bit``."""
    n = b.shape[0]
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.int32)).reshape(1, 1, 4, 1)
    return ((b.to(torch.int32).reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256)


def _pack_scales(ls: torch.Tensor) -> torch.Tensor:
    """(N, 16) 6-bit scales -> (N, 12) uint8."""
    n = ls.shape[0]
    low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)  # (N, 8)
    hi = (ls >> 4).reshape(n, 4, 4)  # (N, group j//4, j%4)
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)  # (N, 4)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def _unpack_scales(b: torch.Tensor) -> torch.Tensor:
    """(N, 12) uint8 -> (N, 16) int32 scales in -32..31."""
    b = b.to(torch.int32)
    low = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], dim=1)  # (N, 16)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.int32)).reshape(1, 4, 1)
    high = ((b[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)  # index j = 4*(j//4) + j%4
    return (low | (high << 4)) - 32


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 110) uint8."""
    n = x.shape[0]
    scales, levels = make_q3_quants(x.reshape(n * 16, 16).T.contiguous(), 4)  # columns = sub-blocks
    levels = levels.T  # (N*16, 16)
    scales = scales.reshape(n, 16)
    _, max_scale = first_absmax(scales)  # (N,)
    has = max_scale != 0
    iscale = fdiv(-32.0, torch.where(has, max_scale, 1.0))
    ls = torch.clamp(nearest_int(iscale[:, None] * scales), -32, 31) + 32  # (N, 16)
    ls = torch.where(has[:, None], ls, torch.zeros_like(ls))
    d = torch.where(has, fdiv(1.0, iscale), 0.0)
    dq = f16_round(d)[:, None] * (ls - 32).to(torch.float32)  # (N, 16) what dequantization reads
    nz = dq != 0
    requant = torch.clamp(nearest_int(x.reshape(n, 16, 16) / torch.where(nz, dq, 1.0)[:, :, None]), -4, 3) + 4
    levels = torch.where(nz[:, :, None], requant, levels.reshape(n, 16, 16)).reshape(n, 256)
    high = levels > 3
    low = torch.where(high, levels - 4, levels)
    hmask = pack_bits(high.reshape(n, 8, 32).transpose(1, 2).reshape(n, 256))  # (N, 32)
    return torch.cat([hmask, pack_2bit(low), _pack_scales(ls), f16_bytes(d)], dim=1)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    """(N, 110) uint8 -> (N, 256) float32."""
    n = b.shape[0]
    high = unpack_bits(b[:, :32]).reshape(n, 32, 8).transpose(1, 2).reshape(n, 256)
    codes = unpack_2bit(b[:, 32:96]) + 4 * high - 4  # (N, 256) in -4..3
    dl = f16_from_bytes(b[:, 108:110])[:, None] * _unpack_scales(b[:, 96:108]).to(torch.float32)  # (N, 16)
    return (dl[:, :, None] * codes.reshape(n, 16, 16).to(torch.float32)).reshape(n, 256)
