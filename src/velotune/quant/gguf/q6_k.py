"""Q6_K: super-blocks of 256 values, 16 sub-blocks of 16 with int8 scales (210 bytes).

Layout: 128 B low nibbles (ql) | 64 B high 2-bit pairs (qh) | 16 x int8 scales | d fp16;
value = d * sc * (q - 32). In 128-value half c, ql byte l holds codes 128c + l and
128c + 64 + l, byte 32 + l holds 128c + 32 + l and 128c + 96 + l; qh byte l holds the high bits
of those four codes. Quantization follows ``quantize_row_q6_K_ref`` (``make_qx_quants`` with
weights x^2 per sub-block, 8-bit scales against the largest one, then re-rounding).
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import f16_bytes, f16_from_bytes, f16_round, fdiv, first_absmax, nearest_int
from velotune.quant.gguf._search import GROUP_MAX_EPS, make_qx_quants

QK_K = 256


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 210) uint8."""
    n = x.shape[0]
    scales, levels = make_qx_quants(x.reshape(n * 16, 16).T.contiguous(), 32)  # columns = sub-blocks
    levels = levels.T  # (N*16, 16)
    scales = scales.reshape(n, 16)
    max_abs, max_scale = first_absmax(scales)  # (N,)
    empty = max_abs < GROUP_MAX_EPS
    safe_max = torch.where(empty, torch.ones_like(max_scale), max_scale)
    iscale = fdiv(-128.0, safe_max)  # (N,)
    d = fdiv(1.0, iscale)
    sc = torch.clamp(nearest_int(iscale[:, None] * scales), max=127)  # (N, 16)
    dq = f16_round(d)[:, None] * sc.to(torch.float32)  # (N, 16)
    nz = dq != 0
    x3 = x.reshape(n, 16, 16)
    requant = torch.clamp(nearest_int(x3 / torch.where(nz, dq, 1.0)[:, :, None]), -32, 31) + 32
    levels = torch.where(nz[:, :, None], requant, levels.reshape(n, 16, 16)).reshape(n, 2, 4, 32)
    ql = torch.cat([(levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4),
                    (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)], dim=2)  # (N, 2, 64)
    hi = levels >> 4  # (N, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (N, 2, 32)
    out = torch.cat([ql.reshape(n, 128).to(torch.uint8), qh.reshape(n, 64).to(torch.uint8),
                     sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    """(N, 210) uint8 -> (N, 256) float32."""
    n = b.shape[0]
    ql = b[:, :128].to(torch.int32).reshape(n, 2, 2, 32)  # (N, half, byte group, l)
    qh = b[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # (N, 16)
    d = f16_from_bytes(b[:, 208:210])
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.int32)).reshape(1, 1, 4, 1)
    codes = (low | (((qh >> shifts) & 3) << 4)) - 32  # (N, 2, 4, 32)
    scale = (d[:, None] * sc).reshape(n, 2, 4, 2, 1)  # (N, half, quarter, 16-group, 1)
    y = scale * codes.reshape(n, 2, 4, 2, 16).to(torch.float32)
    return y.reshape(n, 256)
