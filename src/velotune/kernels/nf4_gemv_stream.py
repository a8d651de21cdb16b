"""NF4 GEMV built for bandwidth: y_i = x W_i^T with W_i packed NF4, streamed as 32-bit words.

Why a second NF4 GEMV (kernels/nf4_gemv.py is the first): at batch 1 an 8B NF4 decode step is the
reading of ~3.5 GB of packed weights and absmax codes, and 250 tokens/s needs that read at about
1.6 TB/s or more. The first kernel reached 0.26-0.37 TB/s on the H200 (BENCHMARKS.md), below
bitsandbytes' gemv_4bit (0.5-1.0). What this one changes, each for a cost counted in the sm_90
compile of both (SASS of the K loop; no GPU run yet):

  * code look-ups read a 16-entry fp32 table (64 bytes: one L1 line) twice a byte. The first
    kernel's default read a 256-entry int64 pair table (2 KB, 16 lines): a warp's gather of 32
    random bytes touches ~13 lines, ~13 L1 passes per instruction instead of one, which caps it
    near 0.6 TB/s whatever else it does (`LOOKUP` = 1 keeps that variant for the sweep);
  * x is read as packed pairs: byte j of a weight row holds columns 2j (high nibble) and 2j + 1
    (low nibble), and x viewed as int32 (bf16/fp16) or int64 (fp32) puts exactly those columns in
    pair j, so a bf16 pair becomes two fp32 by a shift and a mask (the first kernel read even and
    odd columns with two stride-2 loads and converted each);
  * the weight is read as int32 words, one per thread and row (a warp's 32 lanes read one 128-byte
    run of a row), and each thread holds all BLOCK_N rows of its words, so its x pairs (one (NB, HW)
    tensor per byte position of a word, in the same layout) serve BLOCK_N rows: no x shuffle
    between layouts, x loads amortised over the rows;
  * a thread's 8 codes of a word are summed in a fused multiply-add chain, scaled once by their
    block's absmax, and kept per thread until after the K loop: one cross-thread sum per output
    (the first kernel reduced across threads once per quantization block);
  * the next K step's words and absmax are requested before this step's codes are read
    (`PREFETCH`): Triton's pipeliner only overlaps loads that feed `tl.dot`, and otherwise each
    program waits a DRAM round trip per step.
  Counted in the sm_90 SASS of the K loop as Triton 3.6 (the GPU machine's) compiles it, default
  shape (8 rows x 1024 columns, 4 warps): 14.2 instructions a weight byte, 64 registers (8
  programs an SM, ~64 KB of weight in flight an SM), 2 barriers a step (the scales' change of
  layout). `LOOKUP` = 0 addresses the codes by OR into the 64-byte aligned table instead of a
  64-bit add: 12.2-12.7 a byte but 180 registers (2 programs an SM); the sweep decides
  (bench/nf4_gemv_sass.py prints these counts). The first
  kernel's loop, compiled the same way (its default shape), needs 42 a byte (47 with two look-ups
  a byte) and 64 barriers a step (its x and partial sums change layout through shared memory).
  An H200 issues about 33e12 thread-instructions a second: 14 a byte allows ~2.4 TB/s at full
  issue, ~1.7 at 70%; 42 allowed 0.8 at full issue.

Not done, and why: split-K (programs are already 512-1792 per launch at the 8B shapes, several per
SM, and a split would need an fp32 atomic or a second pass before the GLU and residual epilogues);
a register-only look-up (PRMT byte permutes in inline assembly: GPU only, so the CPU tests could not
run the code the GPU runs, and counted at ~4 instructions a code it would not beat the table);
`tl.gather` from a 16-element register tensor (compiles to shuffles and selects: ~14 instructions a
code against ~5 for a table read).

Layout and meaning as kernels/nf4_gemv.py (bitsandbytes NF4, double-quantized absmax decoded per
block in the kernel, K a multiple of the quantization block), same API and fused variants (up to
three weights per launch, gate/up with the gated activation, the RMSNorm prologue, the residual
epilogue), same reference. 2..8 rows of x: one program per row of x and tile of weight rows, the
programs of one tile neighbours in launch order (the tile's bytes come from DRAM once, then from
L2), each decoding the codes again: kernels/nf4_gemv.py decodes once for all rows and stays the
decode path's kernel there until a GPU sweep says otherwise. No autograd; CUDA-graph safe (tables
prepared on a weight's first call). The decode path's one-row 4-bit GEMV on CUDA
(fast/decode_linear.py `OWN_NF4_GEMV_AT_ONE_ROW`): faster than bitsandbytes' gemv_4bit on every 8B
projection group on the H200 (bench/bench_gemv.py --kinds nf4stream).
"""

from __future__ import annotations

import torch

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl
from .gemv import ACTIVATIONS, MAX_WEIGHTS, _activation, check_inputs, norm_arguments
from .nf4_gemv import _tables, fusable, nf4_gemv_reference

# (BLOCK_N rows, BLOCK_K columns, num_warps, LOOKUP, PREFETCH) per launch kind; module-level so the
# bench can sweep it. LOOKUP 2: two reads of the 16-entry code table a byte at pointer + nibble; 0:
# the same at table | 4 x nibble (fewer instructions, 180 registers under Triton 3.6); 1: one read of
# the 256-entry (high, low) pair table. PREFETCH: the next K step's loads are issued before this
# step's codes are read. "rows": every kind when x has 2..8 rows (one program per row of x and tile).
# Tuned on the H200 (bench_gemv.py --kinds nf4stream, 8B shapes at one row, BENCHMARKS.md): PREFETCH
# off is 3-5% faster for q/k/v and o, on for gate/up; the down projection's long K takes BLOCK_K 2048.
# "rows" is untuned (the decode path sends 2..8 rows to kernels/nf4_gemv.py).
CONFIG = {
    "dense": (8, 1024, 4, 2, False),
    "dense_long_k": (8, 2048, 4, 2, True),
    "glu": (8, 1024, 4, 2, True),
    "dense_norm": (8, 1024, 4, 2, False),
    "glu_norm": (8, 1024, 4, 2, True),
    "rows": (8, 1024, 4, 2, True),
}
LONG_K = 8192  # from this K on, "dense_long_k" (the down projection)
_PAIR_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # x's dtype -> the kernel's XKIND
# id(code table) -> (the table, its 64-byte aligned copy), for tables not already aligned (rare: a view).
_ALIGNED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@jit
def _pairs(v, KIND: tl.constexpr):
    """Packed pairs -> (even, odd) fp32: v holds elements 2j (low half) and 2j + 1 (high half) of a
    bf16 (KIND 0) or fp16 (1) vector as int32, or of an fp32 vector (2) as int64."""
    if KIND == 0:  # a bf16 is the high half of the fp32 of the same value
        even = (v << 16).to(tl.float32, bitcast=True)
        odd = (v & -65536).to(tl.float32, bitcast=True)
    elif KIND == 1:
        even = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = v.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@jit
def _step_loads(w_ptr, ABSMAX, blocks, col, k0, KW, K, HW: tl.constexpr, BS: tl.constexpr, EVEN_K: tl.constexpr):
    """The K step at word k0: its weight words (HW, NB, BN) and its blocks' absmax (NB, BN) as stored
    (uint8 codes when double-quantized, else fp32); blocks past K read as 0 (K is a multiple of BS,
    so blocks are wholly in or out)."""
    kb = k0 // HW  # the step's first block within the row
    if EVEN_K:
        return tl.load(w_ptr + k0), tl.load(ABSMAX + blocks + kb)
    ok = (k0 + col) < KW  # (HW, NB)
    block_ok = (kb + tl.arange(0, col.shape[1]))[:, None] < (K // BS)  # (NB, 1)
    return tl.load(w_ptr + k0, mask=ok[:, :, None], other=0), tl.load(ABSMAX + blocks + kb, mask=block_ok, other=0)


@jit
def _stream_tile(XP, WORDS, ABSMAX, NESTED_ABSMAX, NESTED_MAP, OFFSET, CODES, rows, N, K, KW,
                 eps, NORM_P, norm_offset,
                 BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
                 NESTED: tl.constexpr, EVEN_K: tl.constexpr, XKIND: tl.constexpr, NKIND: tl.constexpr,
                 LOOKUP: tl.constexpr, PREFETCH: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """One row of x . W[rows] (BN, K)^T from packed NF4 -> (BN,) fp32 (rows past N read row N - 1).

    WORDS: the packed weight as int32 words, KW = K / 8 a row (4 bytes, 8 codes); XP: the row of x
    as packed pairs (K / 2,), pair 4i + k holding the columns of byte k of word i; NORM_P: the norm
    weight as packed pairs. A K step is NB = BK / BS quantization blocks of HW = BS / 8 words: the
    weight tile is (HW, NB, BN) words, one a thread and row (32-bit loads, a warp's 32 lanes one
    contiguous 128-byte run), so each thread's x pairs are one (HW, NB) tensor per byte position k
    in the tile's own layout and serve all BN rows the thread holds. Why this order of dimensions:
    no dimension of the tile or of x's pairs is contiguous as Triton sees them (the words by the
    hint, x's pairs by their stride of 4), and Triton 3.6 (the GPU machine's) then orders threads
    from dimension 0 up, for both, which puts a warp's lanes along a row's words (coalesced) and
    the rows inside each thread, and gives x the tile's layout (Triton 3.9 orders from the last
    dimension: correct, but x changes layout through shared memory; re-check on an upgrade with
    tests/kernels/gpu_compile_check.py's counts). The block's scale multiplies the
    thread's 8-code partial sum once (no cross-thread sum until after the K loop). CODES: the 16
    fp32 codes (LOOKUP 0: 64-byte aligned, read at table | 4 x nibble; 2: read at CODES + nibble)
    or the 256 int64 (high code bits << 32 | low code bits) pairs (LOOKUP 1, one read a byte).
    NORM: the product is of RMSNorm(x); x^2 is summed as x is read and rstd scales the sum at the
    end (as kernels/gemv.py)."""
    NB: tl.constexpr = BK // BS
    HW: tl.constexpr = BS // 8
    b = tl.arange(0, NB)
    j = tl.max_contiguous(tl.arange(0, HW), 1)  # one word a thread: see the docstring
    safe_rows = tl.minimum(rows, N - 1).to(tl.int64)  # (BN,)
    col = j[:, None] + b[None, :] * HW  # (HW, NB): word of the K step
    w_ptr = WORDS + col[:, :, None] + safe_rows[None, None, :] * KW  # (HW, NB, BN)
    blocks = b[:, None] + safe_rows[None, :] * (K // BS)  # (NB, BN): each tile block's absmax index at k0 = 0
    acc = tl.zeros((HW, NB, BN), dtype=tl.float32)
    squares = tl.zeros((HW, NB), dtype=tl.float32)
    if NESTED:
        offset = tl.load(OFFSET)
    if LOOKUP == 0:
        table = CODES.to(tl.int64, bitcast=True)  # the address of code 0, a multiple of 64
    step: tl.constexpr = BK // 8  # words a row per K step
    if PREFETCH:
        word, raw = _step_loads(w_ptr, ABSMAX, blocks, col, 0, KW, K, HW, BS, EVEN_K)
    for k0 in range(0, KW, step):  # k0: the K step's first word
        if PREFETCH:  # the next step's words and absmax are requested before this step's codes are read,
            # so each thread keeps two steps of loads in flight (Triton pipelines only loads that feed tl.dot)
            if EVEN_K:  # the last step re-reads itself: no mask
                nxt = tl.minimum(k0 + step, KW - step)
            else:
                nxt = k0 + step
            word_next, raw_next = _step_loads(w_ptr, ABSMAX, blocks, col, nxt, KW, K, HW, BS, EVEN_K)
        else:
            word, raw = _step_loads(w_ptr, ABSMAX, blocks, col, k0, KW, K, HW, BS, EVEN_K)
        if not EVEN_K:
            ok = (k0 + col) < KW  # (HW, NB): x and the norm weight of blocks past K read as 0
        if NESTED:
            nested = tl.load(NESTED_ABSMAX + (blocks + k0 // HW) // NBS)  # (NB, BN)
            scale = tl.load(NESTED_MAP + raw.to(tl.int32)) * nested + offset
        else:
            scale = raw  # (NB, BN) fp32
        part = tl.zeros((HW, NB, BN), dtype=tl.float32)
        if LOOKUP == 0:  # 4 x each nibble, four bytes at once: (HW, NB, BN), byte k of a word -> byte k
            hi4 = (word >> 2) & 0x3C3C3C3C
            lo4 = (word << 2) & 0x3C3C3C3C
        for k in tl.static_range(4):  # byte k of each word: x's columns 8i + 2k (high nibble), 8i + 2k + 1
            pairs = 4 * (k0 + col) + k  # (HW, NB)
            if EVEN_K:
                xe, xo = _pairs(tl.load(XP + pairs), XKIND)
            else:
                xe, xo = _pairs(tl.load(XP + pairs, mask=ok, other=0), XKIND)
            if NORM:
                squares += xe * xe + xo * xo
                if EVEN_K:
                    ne, no = _pairs(tl.load(NORM_P + pairs), NKIND)
                else:
                    ne, no = _pairs(tl.load(NORM_P + pairs, mask=ok, other=0), NKIND)
                xe = xe * (ne + norm_offset)
                xo = xo * (no + norm_offset)
            if LOOKUP == 0:  # the table is 64-byte aligned, so address = base | byte offset (no carry)
                hi = tl.load((table | ((hi4 >> (8 * k)) & 255)).to(tl.pointer_type(tl.float32), bitcast=True))
                lo = tl.load((table | ((lo4 >> (8 * k)) & 255)).to(tl.pointer_type(tl.float32), bitcast=True))
            elif LOOKUP == 2:  # pointer + nibble: a 64-bit add per look-up, fewer registers
                hi = tl.load(CODES + ((word >> (8 * k + 4)) & 15))
                lo = tl.load(CODES + ((word >> (8 * k)) & 15))
            else:
                pair = tl.load(CODES + ((word >> (8 * k)) & 255))  # (HW, NB, BN) int64
                hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
            part += xe[:, :, None] * hi
            part += xo[:, :, None] * lo
        acc += part * scale[None, :, :]  # one multiply per 8 codes
        if PREFETCH:
            word, raw = word_next, raw_next
    out = tl.sum(tl.sum(acc, axis=0), axis=0)  # (BN,)
    if NORM:
        out = out * tl.rsqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / K + eps)
    return out


@jit
def _store_row(OUT, acc, m, rows, N, RES, RESIDUAL: tl.constexpr):
    """acc (BN,) fp32 -> OUT[m, rows] (OUT (M, N)) in OUT's dtype. RESIDUAL: OUT = RES + acc, acc
    rounded to OUT's dtype first (as `x + h` of the rounded h adds)."""
    offs = m * N + rows
    ok = rows < N
    if RESIDUAL:
        acc = acc.to(OUT.dtype.element_ty).to(tl.float32) + tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@jit
def _nf4_stream_kernel(
    XP, OUT0, OUT1, OUT2,  # XP: x (M, K) as packed pairs (M, K / 2); OUT_i (M, N_i); unused slots repeat slot 0
    P0, A0, NA0, NM0, OF0, QM0,  # weight 0: words (int32), absmax (codes), nested absmax, nested map, offset, codes
    P1, A1, NA1, NM1, OF1, QM1,
    P2, A2, NA2, NM2, OF2, QM2,
    N0, N1, N2, K, KW, T0, T1,  # KW = K / 8 words a row (an argument: divisibility seen); T_i: programs of weight i
    NORM_P, eps, norm_offset,  # NORM: x is RMS-normalised with the weight NORM_P (packed pairs, K / 2) first
    RES,  # RESIDUAL (one weight): OUT0 = RES (M, N0) + x W0^T
    BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, XKIND: tl.constexpr, NKIND: tl.constexpr, LOOKUP: tl.constexpr,
    PREFETCH: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Grid (M, tiles): program (m, t) computes row m of x against tile t's BN output rows; the
    programs of one tile and different rows of x are neighbours in launch order, so a tile's bytes
    come from DRAM once and from L2 for the other rows."""
    m = tl.program_id(0)
    pid = tl.program_id(1)
    xp = XP + m * (KW * 4)
    if GLU:  # weight 0 = gate, weight 1 = up -> OUT0 = act(x gate^T) * (x up^T)
        rows = pid * BN + tl.arange(0, BN)
        g = _stream_tile(xp, P0, A0, NA0, NM0, OF0, QM0, rows, N0, K, KW, eps, NORM_P, norm_offset,
                         BN, BK, BS, NBS, NESTED, EVEN_K, XKIND, NKIND, LOOKUP, PREFETCH, NORM)
        u = _stream_tile(xp, P1, A1, NA1, NM1, OF1, QM1, rows, N0, K, KW, eps, NORM_P, norm_offset,
                         BN, BK, BS, NBS, NESTED, EVEN_K, XKIND, NKIND, LOOKUP, PREFETCH, NORM)
        g = g.to(OUT0.dtype.element_ty).to(tl.float32)  # rounded as the unfused path's outputs are
        u = u.to(OUT0.dtype.element_ty).to(tl.float32)
        _store_row(OUT0, _activation(g, ACT) * u, m, rows, N0, OUT0, False)
    elif pid < T0:
        rows = pid * BN + tl.arange(0, BN)
        acc = _stream_tile(xp, P0, A0, NA0, NM0, OF0, QM0, rows, N0, K, KW, eps, NORM_P, norm_offset,
                           BN, BK, BS, NBS, NESTED, EVEN_K, XKIND, NKIND, LOOKUP, PREFETCH, NORM)
        _store_row(OUT0, acc, m, rows, N0, RES, RESIDUAL)
    elif pid < T0 + T1:
        rows = (pid - T0) * BN + tl.arange(0, BN)
        acc = _stream_tile(xp, P1, A1, NA1, NM1, OF1, QM1, rows, N1, K, KW, eps, NORM_P, norm_offset,
                           BN, BK, BS, NBS, NESTED, EVEN_K, XKIND, NKIND, LOOKUP, PREFETCH, NORM)
        _store_row(OUT1, acc, m, rows, N1, OUT1, False)
    else:
        rows = (pid - T0 - T1) * BN + tl.arange(0, BN)
        acc = _stream_tile(xp, P2, A2, NA2, NM2, OF2, QM2, rows, N2, K, KW, eps, NORM_P, norm_offset,
                           BN, BK, BS, NBS, NESTED, EVEN_K, XKIND, NKIND, LOOKUP, PREFETCH, NORM)
        _store_row(OUT2, acc, m, rows, N2, OUT2, False)


def nf4_gemv_stream_reference(x: torch.Tensor, weights, activation: str | None = None, norm=None, residual=None
                              ) -> list[torch.Tensor]:  # fmt: skip
    """The meaning (the same as kernels/nf4_gemv.py's): each weight dequantized bit-exactly in its
    own dtype, cast to x's, then x W^T (or the gated activation of gate and up, of RMSNorm(x) with
    `norm`, plus `residual`) as kernels/gemv.py's reference computes it."""
    return nf4_gemv_reference(x, weights, activation, norm, residual)


def as_pairs(t: torch.Tensor) -> torch.Tensor:
    """t (..., K) bf16/fp16/fp32, K even -> the same memory as (..., K / 2) int32 (16-bit dtypes) or
    int64 (fp32): word j holds elements 2j and 2j + 1. Copies only when t's layout forbids the view."""
    wide = torch.int64 if t.dtype == torch.float32 else torch.int32
    if not t.is_contiguous() or t.storage_offset() % 2:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(wide)


def _aligned(codes: torch.Tensor) -> torch.Tensor:
    """The 16 fp32 codes at a 64-byte aligned address (the kernel ORs byte offsets into it): the
    table itself (allocations are aligned) or, once per table, an aligned copy."""
    if codes.data_ptr() % 64 == 0:
        return codes
    entry = _ALIGNED.get(id(codes))
    if entry is None or entry[0] is not codes:
        room = torch.empty(32, dtype=torch.float32, device=codes.device)
        skip = (-room.data_ptr() % 64) // 4
        entry = _ALIGNED[id(codes)] = (codes, room[skip:skip + 16].copy_(codes))
    return entry[1]


def _words(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes (flat uint8, K / 2 a row) as int32 words; a copy only when misaligned."""
    packed = packed.reshape(-1)
    if packed.storage_offset() % 4 or packed.numel() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


def config_for(M: int, K: int, activation: str | None, norm) -> tuple:
    """The CONFIG entry of a launch: (BLOCK_N, BLOCK_K, num_warps, LOOKUP, PREFETCH)."""
    if M > 1:
        return CONFIG["rows"]
    base = "glu" if activation is not None else "dense"
    key = base + ("_norm" if norm is not None else "_long_k" if K >= LONG_K and activation is None else "")
    return CONFIG.get(key, CONFIG[base])


def nf4_gemv_stream(x: torch.Tensor, weights, activation: str | None = None, use_triton: bool | None = None,
                    norm=None, residual: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """x (M, K), M <= 8, and bitsandbytes 4-bit weights (``Params4bit`` or ``Linear4bit``, NF4,
    (N_i, K)) -> [x W_i^T (M, N_i)] in x's dtype, one launch; with `activation`, weights = (gate,
    up) and the result is [act(x gate^T) * (x up^T)]. `norm` = (weight (K,), eps, offset): the
    projections read RMSNorm(x); `residual` (M, N), one weight: residual + x W^T. The same call as
    kernels/nf4_gemv.py's `nf4_gemv`, and the same fallback to the reference where the kernel
    cannot run (no Triton for these tensors, K not a multiple of the quantization block, mixed layouts)."""
    check_inputs(x, weights, activation, "nf4_gemv_stream", norm, residual)
    prepared = None if use_triton is False else fusable(x, weights)
    if prepared is None:
        if use_triton:
            raise ValueError("nf4_gemv_stream: use_triton=True but the kernel cannot run these weights (x's "
                             "device/dtype, K not a multiple of the quantization block, or weights of different "
                             "layouts)")
        return nf4_gemv_stream_reference(x, weights, activation, norm, residual)
    M, K = x.shape
    ns = [launch.shape[0] for _, launch in prepared]
    if activation is not None and ns[0] != ns[1]:
        raise ValueError(f"nf4_gemv_stream: gate ({ns[0]} rows) and up ({ns[1]} rows) differ in shape")
    if norm is not None and norm[0].dtype not in _PAIR_KINDS:
        raise ValueError(f"nf4_gemv_stream: the norm weight must be bf16, fp16 or fp32, got {norm[0].dtype}")
    meta = prepared[0][1].meta
    bs = meta["BLOCKSIZE"]
    BN, BK, warps, lookup, prefetch = config_for(M, K, activation, norm)
    BK = max(bs, min(BK, next_power_of_2(K)))
    if activation is not None:
        outs = [torch.empty(M, ns[0], dtype=x.dtype, device=x.device)]
        tiles, grid = [-(-ns[0] // BN), 0], -(-ns[0] // BN)
    else:
        outs = [torch.empty(M, n, dtype=x.dtype, device=x.device) for n in ns]
        tiles = [-(-n // BN) for n in ns] + [0]
        grid = sum(tiles)
    pad = MAX_WEIGHTS - len(prepared)
    args = []
    for packed, launch in prepared + [prepared[0]] * pad:
        packed, *tables, codes = _tables(launch, packed, lookup == 1)
        args += [_words(packed), *tables, codes if lookup == 1 else _aligned(codes)]
    os_ = outs + [outs[0]] * (MAX_WEIGHTS - len(outs))
    norm_w, eps, norm_offset = norm_arguments(norm, x)
    kernel_for(_nf4_stream_kernel)[(M, grid)](
        as_pairs(x), *os_, *args, *(ns + [ns[0]] * pad), K, K // 8, tiles[0], tiles[1],
        as_pairs(norm_w), eps, norm_offset, x if residual is None else residual.contiguous(),
        BN=BN, BK=BK, BS=bs, NBS=meta["NESTED_BLOCKSIZE"], NESTED=meta["NESTED"], EVEN_K=K % BK == 0,
        XKIND=_PAIR_KINDS[x.dtype], NKIND=_PAIR_KINDS[norm_w.dtype], LOOKUP=lookup, PREFETCH=bool(prefetch),
        GLU=activation is not None,
        ACT=ACTIVATIONS.get(activation, 0), NORM=norm is not None, RESIDUAL=residual is not None, num_warps=warps,
    )  # fmt: skip
    return outs
