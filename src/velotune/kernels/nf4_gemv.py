"""Fused NF4 GEMV for decoding: y_i = x W_i^T with W_i packed NF4, dequantized in registers only.

Why: at batch 1 a 4-bit model's step is the reading of its packed weights (0.5 byte a value plus
1/64 byte of absmax codes), 4.5 GB for an 8B model. The plain path's bitsandbytes layers reached 16%
of that bound on the H200 (a step, all kernels counted), and dequantizing each weight to bf16 before a cuBLAS GEMV writes and reads 2
bytes a value more (BENCHMARKS.md). Here each program reads its tile of packed bytes, looks the
two nibbles up in the 16-entry code table, and multiplies by x; no bf16 weight is ever written.

Layout (kernels/nf4.py, bitsandbytes): the weight (N, K) flattened row-major, two codes a byte,
the earlier element in the high nibble, one absmax per BLOCKSIZE values; with double quantization
absmax = nested_map[q] * nested_absmax[block // NESTED_BLOCKSIZE] + offset. K must be a multiple of
BLOCKSIZE (every quantization block inside one row: true of every model shape), so a tile of
BLOCK_K columns of BLOCK_N rows holds whole blocks. The high nibbles multiply x's even columns
and the low nibbles its odd ones, so bytes are never re-interleaved.

Scale after the sum: within a block every value shares one scale, so the kernel sums
x * code over the block and multiplies the (M, BN, blocks) partial sums by the scales, one
multiply a block instead of one a value. The result equals the reference (dequantize, then
x W^T) up to fp32 summation order and the reference's rounding of each weight to x's dtype.

Same launch shape as kernels/gemv.py: up to three weights per launch (q, k, v), or (gate, up)
with the gated activation in the epilogue. No autograd; CUDA-graph safe (per weight the tables
are prepared once by kernels/nf4.py's cache; a call allocates its outputs and launches once).

Status (BENCHMARKS.md, H200): correct, but 0.26-0.37 TB/s of packed weights, slower than
bitsandbytes' gemv_4bit (0.5-1.0 TB/s), which the decode path therefore uses at one row
(fast/decode_linear.py); this kernel serves 2..8 rows where the plan allows them (fast/plan.py
GEMV_ROWS, 1 by default since cuBLAS won at 8 rows) and the CPU. CONFIG is untuned.
"""

from __future__ import annotations

import torch

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl
from .gemv import ACTIVATIONS, MAX_WEIGHTS, _activation, _store_rows, check_inputs, gemv_reference, norm_arguments
from .nf4 import dequantize_nf4_weight, prepared_nf4_weight

# (BLOCK_N, BLOCK_K, num_warps, PAIRS) for separate weights and for the gate/up GLU launch;
# module-level so the bench can sweep it. PAIRS: one 64-bit look-up a byte (both nibbles' codes)
# instead of two 32-bit ones.
CONFIG = {"dense": (8, 512, 4, True), "glu": (8, 512, 4, True)}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# id(code table) -> (the table, its 256 byte -> (hi code bits << 32 | lo code bits) pairs): built on a
# weight's first call (the engine's warm-up, before graph capture), the table held so its id stays its own.
_PAIR_TABLES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@jit
def _nf4_tile(X, PACKED, ABSMAX, NESTED_ABSMAX, NESTED_MAP, OFFSET, CODES, rows, M, N, K, KH,
              eps, NORM_W, norm_offset,
              MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
              NESTED: tl.constexpr, EVEN_K: tl.constexpr, PAIRS: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """x (M, K) . W[rows] (BN, K)^T from packed NF4 -> (MP, BN) fp32 (rows past N read row N - 1).

    A K step of BK columns is NB = BK / BS quantization blocks, unrolled: per block a (BN, BS/2)
    tile of bytes and one scale per row (2-d tensors only; a (BN, NB, BS/2) formulation compiled
    to 0.35 TB/s on the H200). KH = K / 2 bytes a row. CODES: the 16 fp32 code values, or with
    PAIRS the 256 int64 pairs (high nibble's fp32 bits << 32 | low nibble's), one look-up a byte.
    NORM: the product is of RMSNorm(x), rstd applied to the sums at the end, as in kernels/gemv.py."""
    NB: tl.constexpr = BK // BS  # quantization blocks per K step
    HB: tl.constexpr = BS // 2  # bytes per block
    m = tl.arange(0, MP)
    h = tl.arange(0, HB)
    safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
    row_bytes = PACKED + safe_rows[:, None] * KH + h[None, :]  # (BN, HB): the bytes of block 0
    row_blocks = safe_rows * (K // BS)  # (BN,) index of each row's first quantization block
    x_cols = X + m[:, None] * K + 2 * h[None, :]  # (MP, HB): x's even columns of block 0; +1: odd
    m_ok = m[:, None] < M
    acc = tl.zeros((MP, BN), dtype=tl.float32)
    squares = tl.zeros((MP,), dtype=tl.float32)
    if NESTED:
        offset = tl.load(OFFSET)
    for k0 in range(0, K, BK):
        for nb in tl.static_range(NB):
            kb = k0 + nb * BS  # the block's first column
            block = row_blocks + kb // BS  # (BN,)
            if EVEN_K:
                byte = tl.load(row_bytes + kb // 2).to(tl.int32)  # (BN, HB)
                xe = tl.load(x_cols + kb, mask=m_ok, other=0.0).to(tl.float32)  # (MP, HB)
                xo = tl.load(x_cols + kb + 1, mask=m_ok, other=0.0).to(tl.float32)
                if NESTED:
                    q = tl.load(ABSMAX + block).to(tl.int32)
                    nested = tl.load(NESTED_ABSMAX + block // NBS)
                else:
                    scale = tl.load(ABSMAX + block)
            else:
                ok = (kb + 2 * h)[None, :] < K  # (1, HB); K is a multiple of BS: whole blocks are in or out
                row_ok = (safe_rows * 0 + kb) < K  # (BN,)
                byte = tl.load(row_bytes + kb // 2, mask=ok, other=0).to(tl.int32)
                xe = tl.load(x_cols + kb, mask=m_ok & ok, other=0.0).to(tl.float32)
                xo = tl.load(x_cols + kb + 1, mask=m_ok & ok, other=0.0).to(tl.float32)
                if NESTED:
                    q = tl.load(ABSMAX + block, mask=row_ok, other=0).to(tl.int32)
                    nested = tl.load(NESTED_ABSMAX + block // NBS, mask=row_ok, other=0.0)
                else:
                    scale = tl.load(ABSMAX + block, mask=row_ok, other=0.0)
            if NESTED:
                scale = tl.load(NESTED_MAP + q) * nested + offset  # (BN,) fp32
            if NORM:  # x^2 summed as it goes; rstd scales the sums at the end
                squares += tl.sum(xe * xe + xo * xo, axis=1)
                cols = kb + 2 * h
                xe = xe * (tl.load(NORM_W + cols, mask=cols < K, other=0.0).to(tl.float32) + norm_offset)[None, :]
                xo = xo * (tl.load(NORM_W + cols + 1, mask=cols < K, other=0.0).to(tl.float32) + norm_offset)[None, :]
            if PAIRS:
                pair = tl.load(CODES + byte)  # (BN, HB) int64
                hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # the even column's code
                lo = pair.to(tl.int32).to(tl.float32, bitcast=True)  # the odd column's
            else:
                hi = tl.load(CODES + (byte >> 4))  # (BN, HB) fp32 codes of the even columns
                lo = tl.load(CODES + (byte & 15))  # the odd columns
            part = tl.sum(xe[:, None, :] * hi[None, :, :] + xo[:, None, :] * lo[None, :, :], axis=2)  # (MP, BN)
            acc += part * scale[None, :]  # one multiply a block and row
    if NORM:
        acc = acc * tl.rsqrt(squares / K + eps)[:, None]
    return acc


@jit
def _nf4_gemv_kernel(
    X, OUT0, OUT1, OUT2,  # X (M, K); OUT_i (M, N_i); unused slots repeat slot 0
    P0, A0, NA0, NM0, OF0, QM0,  # weight 0: packed bytes, absmax (codes), nested absmax, nested map, offset, code table
    P1, A1, NA1, NM1, OF1, QM1,
    P2, A2, NA2, NM2, OF2, QM2,
    M, N0, N1, N2, K, KH, T0, T1,  # KH = K / 2 (an argument: Triton sees its divisibility); T_i: programs of weight i
    NORM_W, eps, norm_offset,  # NORM: x is RMS-normalised with weight NORM_W (K,) first
    RES,  # RESIDUAL (one weight): OUT0 = RES (M, N0) + x W0^T
    MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, PAIRS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if GLU:  # weight 0 = gate, weight 1 = up -> OUT0 = act(x gate^T) * (x up^T)
        rows = pid * BN + tl.arange(0, BN)
        g = _nf4_tile(X, P0, A0, NA0, NM0, OF0, QM0, rows, M, N0, K, KH, eps, NORM_W, norm_offset,
                        MP, BN, BK, BS, NBS, NESTED, EVEN_K, PAIRS, NORM)
        u = _nf4_tile(X, P1, A1, NA1, NM1, OF1, QM1, rows, M, N0, K, KH, eps, NORM_W, norm_offset,
                        MP, BN, BK, BS, NBS, NESTED, EVEN_K, PAIRS, NORM)
        g = g.to(OUT0.dtype.element_ty).to(tl.float32)  # rounded as the unfused path's outputs are
        u = u.to(OUT0.dtype.element_ty).to(tl.float32)
        _store_rows(OUT0, _activation(g, ACT) * u, rows, M, N0, MP, OUT0, False)
    elif pid < T0:
        rows = pid * BN + tl.arange(0, BN)
        acc = _nf4_tile(X, P0, A0, NA0, NM0, OF0, QM0, rows, M, N0, K, KH, eps, NORM_W, norm_offset,
                        MP, BN, BK, BS, NBS, NESTED, EVEN_K, PAIRS, NORM)
        _store_rows(OUT0, acc, rows, M, N0, MP, RES, RESIDUAL)
    elif pid < T0 + T1:
        rows = (pid - T0) * BN + tl.arange(0, BN)
        acc = _nf4_tile(X, P1, A1, NA1, NM1, OF1, QM1, rows, M, N1, K, KH, eps, NORM_W, norm_offset,
                        MP, BN, BK, BS, NBS, NESTED, EVEN_K, PAIRS, NORM)
        _store_rows(OUT1, acc, rows, M, N1, MP, OUT1, False)
    else:
        rows = (pid - T0 - T1) * BN + tl.arange(0, BN)
        acc = _nf4_tile(X, P2, A2, NA2, NM2, OF2, QM2, rows, M, N2, K, KH, eps, NORM_W, norm_offset,
                        MP, BN, BK, BS, NBS, NESTED, EVEN_K, PAIRS, NORM)
        _store_rows(OUT2, acc, rows, M, N2, MP, OUT2, False)


def nf4_gemv_reference(x: torch.Tensor, weights, activation: str | None = None, norm=None, residual=None
                       ) -> list[torch.Tensor]:  # fmt: skip
    """The meaning: each bitsandbytes 4-bit weight dequantized (bit-exact, in its own dtype), cast
    to x's dtype, then kernels/gemv.py's reference (x W^T, or the gated activation of gate and up,
    of RMSNorm(x) with `norm`)."""
    dense = [dequantize_nf4_weight(w, use_triton=False).to(x.dtype) for w in weights]
    return gemv_reference(x, dense, activation, norm, residual)


def code_pairs(codes: torch.Tensor) -> torch.Tensor:
    """codes (16,) fp32 -> (256,) int64: for each byte, its high nibble's code bits << 32 | its low nibble's."""
    bits = codes.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (16,)
    byte = torch.arange(256, device=codes.device)
    return (bits[byte >> 4] << 32) | bits[byte & 15]


def _tables(launch, packed, pairs: bool) -> list:
    """The kernel's six arguments of one weight (its prepared launch, see kernels/nf4.py)."""
    codes = launch.quant_map
    if pairs:
        entry = _PAIR_TABLES.get(id(codes))
        if entry is None or entry[0] is not codes:
            entry = _PAIR_TABLES[id(codes)] = (codes, code_pairs(codes))
        codes = entry[1]
    return [packed, launch.absmax, launch.nested_absmax, launch.nested_quant_map, launch.offset, codes]


def fusable(x: torch.Tensor, weights) -> list | None:
    """[(packed bytes, prepared launch)] when the kernel can run these weights for x, else None."""
    if x.dtype not in _DTYPES or not should_use_triton(x, None):
        return None
    prepared = []
    for w in weights:
        packed, launch, _, _ = prepared_nf4_weight(w)
        if launch is None or len(launch.shape) != 2 or launch.shape[1] != x.shape[1] or launch.device != x.device:
            return None
        bs = launch.meta["BLOCKSIZE"]
        if x.shape[1] % bs or bs > 1024:
            return None  # a quantization block crosses rows, or one block exceeds a tile
        prepared.append((packed, launch))
    metas = {(launch.meta["BLOCKSIZE"], launch.meta["NESTED_BLOCKSIZE"], launch.meta["NESTED"])
             for _, launch in prepared}
    return prepared if len(metas) == 1 else None


def nf4_gemv(x: torch.Tensor, weights, activation: str | None = None, use_triton: bool | None = None,
             norm=None, residual: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """x (M, K) and bitsandbytes 4-bit weights (``Params4bit`` or ``Linear4bit``, NF4, (N_i, K))
    -> [x W_i^T (M, N_i)] in x's dtype, one launch; with `activation`, weights = (gate, up) and the
    result is [act(x gate^T) * (x up^T)]. Falls back to the reference where the kernel cannot run
    (no Triton for these tensors, K not a multiple of the quantization block, mixed layouts).
    `norm` = (weight (K,), eps, offset): the projections read RMSNorm(x); `residual` (M, N), one
    weight: residual + x W^T; both as kernels/gemv.py."""
    check_inputs(x, weights, activation, "nf4_gemv", norm, residual)
    prepared = None if use_triton is False else fusable(x, weights)
    if prepared is None:
        if use_triton:
            raise ValueError("nf4_gemv: use_triton=True but the kernel cannot run these weights (x's device/dtype, "
                             "K not a multiple of the quantization block, or weights of different layouts)")
        return nf4_gemv_reference(x, weights, activation, norm, residual)
    x = x.contiguous()
    M, K = x.shape
    ns = [launch.shape[0] for _, launch in prepared]
    if activation is not None and ns[0] != ns[1]:
        raise ValueError(f"nf4_gemv: gate ({ns[0]} rows) and up ({ns[1]} rows) differ in shape")
    meta = prepared[0][1].meta
    bs = meta["BLOCKSIZE"]
    BN, BK, warps, pairs = CONFIG["glu" if activation is not None else "dense"]
    BK = max(bs, min(BK, next_power_of_2(K)))
    if activation is not None:
        outs = [torch.empty(M, ns[0], dtype=x.dtype, device=x.device)]
        tiles, grid = [-(-ns[0] // BN), 0], -(-ns[0] // BN)
    else:
        outs = [torch.empty(M, n, dtype=x.dtype, device=x.device) for n in ns]
        tiles = [-(-n // BN) for n in ns] + [0]
        grid = sum(tiles)
    pad = MAX_WEIGHTS - len(prepared)
    args = [a for packed, launch in prepared + [prepared[0]] * pad for a in _tables(launch, packed, pairs)]
    os_ = outs + [outs[0]] * (MAX_WEIGHTS - len(outs))
    kernel_for(_nf4_gemv_kernel)[(grid,)](
        x, *os_, *args, M, *(ns + [ns[0]] * pad), K, K // 2, tiles[0], tiles[1], *norm_arguments(norm, x),
        x if residual is None else residual.contiguous(),
        MP=next_power_of_2(M), BN=BN, BK=BK, BS=bs, NBS=meta["NESTED_BLOCKSIZE"], NESTED=meta["NESTED"],
        EVEN_K=K % BK == 0, PAIRS=pairs, GLU=activation is not None, ACT=ACTIVATIONS.get(activation, 0),
        NORM=norm is not None, RESIDUAL=residual is not None, num_warps=warps,
    )  # fmt: skip
    return outs
