"""Q5_K: as Q4_K (q4_k.py) with 5-bit codes (176 bytes).

Layout: d fp16 | dmin fp16 | 12 B scales/mins | 32 B high bits | 128 B low nibbles. In the
64-value chunk c, byte l of the nibbles holds codes 64c + l (low) and 64c + 32 + l (high); bits
2c and 2c + 1 of high-bit byte l hold their 5th bits. Search: ``make_qkx2_quants`` with nmax 31,
rmin -0.5 and 16 candidates (``quantize_row_q5_K_ref``).
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import f16_bytes
from velotune.quant.gguf.q4_k import dequantize_scale_min, pack_scales_mins, quantize_scale_min


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 176) uint8."""
    n = x.shape[0]
    d, dmin, ls, lm, levels = quantize_scale_min(x, 31, -0.5, 15)
    lv = levels.reshape(n, 4, 2, 32)  # (N, chunk, half, l)
    ql = ((lv[:, :, 0] & 0xF) | ((lv[:, :, 1] & 0xF) << 4)).reshape(n, 128).to(torch.uint8)
    shifts = (2 * torch.arange(4, device=x.device, dtype=torch.int32)).reshape(1, 4, 1, 1) \
        + torch.arange(2, device=x.device, dtype=torch.int32).reshape(1, 1, 2, 1)  # (1, 4, 2, 1)
    qh = ((lv >> 4) << shifts).sum(dim=(1, 2)).to(torch.uint8)  # (N, 32)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_scales_mins(ls, lm), qh, ql], dim=1)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    """(N, 176) uint8 -> (N, 256) float32."""
    n = b.shape[0]
    qh = b[:, 16:48].to(torch.int32).reshape(n, 1, 1, 32)
    ql = b[:, 48:].to(torch.int32).reshape(n, 4, 1, 32)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.int32)).reshape(1, 4, 1, 1) \
        + torch.arange(2, device=b.device, dtype=torch.int32).reshape(1, 1, 2, 1)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # (N, 4, 2, 32)
    codes = low | (((qh >> shifts) & 1) << 4)
    return dequantize_scale_min(b, codes)
