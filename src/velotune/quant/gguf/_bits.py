"""Small exact helpers shared by the GGUF block codecs.

Every codec works on a 2-D float32 tensor of blocks, ``(N, block_size)``, and produces a uint8
tensor ``(N, type_size)`` laid out exactly like ggml's C structs (little endian). These helpers
do the bit-exact parts: llama.cpp's two rounding rules, fp16 fields and bit packing.
"""

from __future__ import annotations

import torch


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: adds 1.5 * 2**23 in fp32, i.e. round half to even, as int32."""
    return torch.round(v).to(torch.int32)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (ties away from zero), used by Q8_0; torch.round rounds ties to even."""
    t = torch.trunc(v)
    frac = (v - t).abs()
    return torch.where(frac >= 0.5, t + torch.sign(v), t)


def fdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 ``a / b`` like C's, also when one side is a Python number.

    torch computes ``number / tensor`` (and, on CUDA, ``tensor / number``) as a multiplication by
    a reciprocal, which can differ from C's division in the last bit and so flip a rounding.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f`` as ggml writes it."""
    return torch.where(d != 0, fdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


def f16_round(v: torch.Tensor) -> torch.Tensor:
    """The float32 value ggml reads back after storing ``v`` as fp16 (round to nearest even)."""
    return v.to(torch.float16).to(torch.float32)


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(N,) float32 -> (N, 2) uint8: the little-endian fp16 field ``GGML_FP32_TO_FP16(v)``."""
    return v.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) uint8 -> (N,) float32."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, 8k) values in {0, 1} -> (N, k) uint8, bit t of byte b = bits[:, 8b + t] (little endian)."""
    n, m = bits.shape
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))  # (8,)
    return (bits.to(torch.int32).reshape(n, m // 8, 8) * weights).sum(dim=2).to(torch.uint8)


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """(N, k) uint8 -> (N, 8k) int32 bits, the inverse of ``pack_bits``."""
    n, k = b.shape
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)  # (8,)
    return ((b.to(torch.int32).unsqueeze(2) >> shifts) & 1).reshape(n, 8 * k)


def to_u8(v: torch.Tensor) -> torch.Tensor:
    """int tensor -> uint8, keeping the low 8 bits (C's implicit ``uint8_t`` conversion)."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (N, n): (absolute max, the signed value at its first occurrence).

    ggml scans ``if (amax < fabsf(v)) {amax = ...; max = v;}``: the first element of largest
    magnitude wins, and an all-zero row keeps ``max = +0.0``.
    """
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)  # (N, 1) first occurrence
    amax = ax.gather(1, idx).squeeze(1)  # (N,)
    signed = x.gather(1, idx).squeeze(1)  # (N,)
    return amax, torch.where(amax > 0, signed, torch.zeros_like(signed))


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """(n, M) -> (M,): sum over dim 0 in C's left-to-right float32 order.

    ggml's searches accumulate ``sum += ...`` one value at a time; their least-squares step
    subtracts nearly equal products, so a different summation order (torch's tree reduction)
    changes which candidate wins in a few percent of sub-blocks. Summing the (contiguous) rows in
    sequence keeps the result bit-identical to llama.cpp at the cost of n small kernel launches.
    """
    rows = t.unbind(0)  # views, made in one call
    acc = rows[0].clone()
    for row in rows[1:]:
        acc.add_(row)
    return acc
