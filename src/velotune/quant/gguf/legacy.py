"""The 32-value "legacy" GGUF block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each follows ggml's reference quantizer (``quantize_row_*_ref`` in ggml-quants.c, which is what
``ggml_quantize_chunk`` runs without an importance matrix) operation by operation in float32, so
the bytes match llama.cpp's. Block layouts (little endian):
  * Q8_0 (34 B): d fp16 | 32 x int8            value = q * d
  * Q4_0 (18 B): d fp16 | 16 B nibbles          value = (q - 8) * d
  * Q4_1 (20 B): d fp16 | m fp16 | 16 B nibbles value = q * d + m
  * Q5_0 (22 B): d fp16 | qh u32 | 16 B nibbles value = (q - 16) * d
  * Q5_1 (24 B): d fp16 | m fp16 | qh u32 | 16 B nibbles value = q * d + m
Nibble byte j holds element j (low) and element j + 16 (high); bit k of qh is the 5th bit of
element k.
"""

from __future__ import annotations

import torch

from velotune.quant.gguf._bits import (
    f16_bytes,
    f16_from_bytes,
    fdiv,
    first_absmax,
    pack_bits,
    round_half_away,
    safe_inverse,
    unpack_bits,
)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes 0..15 -> (N, 16) uint8: byte j = q[j] | q[j + 16] << 4."""
    q = q.to(torch.int32)
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    """(N, 16) uint8 -> (N, 32) int32 codes, the inverse of ``_nibbles``."""
    b = b.to(torch.int32)
    return torch.cat([b & 0xF, b >> 4], dim=1)


def _five_bit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 32) codes 0..31 -> (qh (N, 4) uint8, qs (N, 16) uint8)."""
    q = q.to(torch.int32)
    return pack_bits((q >> 4) & 1), _nibbles(q & 0xF)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 34) uint8."""
    d = fdiv(x.abs().amax(dim=1), 127.0)  # (N,)
    q = round_half_away(x * safe_inverse(d)[:, None]).to(torch.int8)  # (N, 32)
    return torch.cat([f16_bytes(d), q.view(torch.uint8)], dim=1)


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    """(N, 34) uint8 -> (N, 32) float32."""
    d = f16_from_bytes(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d[:, None]


def _symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = (signed absmax) / -levels, q = min(2*levels - 1, trunc(x/d + levels + 0.5))."""
    _, signed_max = first_absmax(x)
    d = fdiv(signed_max, float(-levels))  # (N,)
    v = x * safe_inverse(d)[:, None] + (levels + 0.5)  # (N, 32)
    q = torch.clamp(torch.trunc(v), max=2 * levels - 1)
    return d, q.to(torch.int32)


def _affine(x: torch.Tensor, levels: int, clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / (levels - 1), q = trunc((x - min)/d + 0.5)."""
    lo = x.amin(dim=1)  # (N,)
    hi = x.amax(dim=1)
    d = fdiv(hi - lo, float(levels - 1))
    q = torch.trunc((x - lo[:, None]) * safe_inverse(d)[:, None] + 0.5)  # (N, 32)
    if clamp:
        q = torch.clamp(q, max=levels - 1)
    return d, lo, q.to(torch.int32)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 18) uint8."""
    d, q = _symmetric(x, 8)
    return torch.cat([f16_bytes(d), _nibbles(q)], dim=1)


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    """(N, 18) uint8 -> (N, 32) float32."""
    d = f16_from_bytes(b[:, :2])
    return (_unnibble(b[:, 2:]) - 8).to(torch.float32) * d[:, None]


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 22) uint8."""
    d, q = _symmetric(x, 16)
    qh, qs = _five_bit(q)
    return torch.cat([f16_bytes(d), qh, qs], dim=1)


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    """(N, 22) uint8 -> (N, 32) float32."""
    d = f16_from_bytes(b[:, :2])
    q = _unnibble(b[:, 6:]) | (unpack_bits(b[:, 2:6]) << 4)
    return (q - 16).to(torch.float32) * d[:, None]


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 20) uint8."""
    d, m, q = _affine(x, 16, clamp=True)
    return torch.cat([f16_bytes(d), f16_bytes(m), _nibbles(q)], dim=1)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    """(N, 20) uint8 -> (N, 32) float32."""
    d, m = f16_from_bytes(b[:, :2]), f16_from_bytes(b[:, 2:4])
    return _unnibble(b[:, 4:]).to(torch.float32) * d[:, None] + m[:, None]


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 24) uint8 (ggml does not clamp Q5_1's codes; they stay <= 31)."""
    d, m, q = _affine(x, 32, clamp=False)
    qh, qs = _five_bit(q)
    return torch.cat([f16_bytes(d), f16_bytes(m), qh, qs], dim=1)


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    """(N, 24) uint8 -> (N, 32) float32."""
    d, m = f16_from_bytes(b[:, :2]), f16_from_bytes(b[:, 2:4])
    q = _unnibble(b[:, 8:]) | (unpack_bits(b[:, 4:8]) << 4)
    return q.to(torch.float32) * d[:, None] + m[:, None]
