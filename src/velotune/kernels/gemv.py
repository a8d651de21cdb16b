"""Small-batch GEMV for decoding: y_i = x W_i^T for a few rows of x, several weights in one launch.

Why: a batch-1 decode step of an 8B model is a string of matrix-vector products bound by reading
the weights. cuBLAS reads the large ones near the bandwidth limit, but the skinny k/v projections
(1024 x 4096) reach about 38% of it and its split-K reductions add a kernel each (BENCHMARKS.md,
profile of one decode step). Here the projections that read the same input (q, k and v) are one
launch over their stacked output rows, without stacking the weights in memory, and the MLP's gate
and up projections are one launch whose epilogue applies the gated activation, so the (M, I)
gate and up outputs are never written; only act(gate) * up is.

Tiling: a program owns BLOCK_N output rows of one weight and walks K in BLOCK_K steps, holding a
(BLOCK_N, BLOCK_K) weight tile; x is read once per tile from L2. Two inner products: a broadcast
multiply and sum (the default: no tensor-core layout shuffles at M = 1) or `tl.dot` with M padded
to 16 rows. Accumulation is fp32; each output is rounded once to x's dtype (the GLU epilogue
rounds gate and up to that dtype first, as the unfused path's activation kernel reads them).

Scope: M <= MAX_ROWS, weights in x's dtype (bf16, fp16 or fp32), no bias (callers add it), no
autograd (frozen base weights at decode time). CUDA-graph safe: one allocation per output, no
host sync. `gemv_reference` is the plain PyTorch meaning and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, kernel_for, next_power_of_2, should_use_triton, tl
from .rms_norm import rms_norm_reference

MAX_ROWS = 8  # rows of x (tokens) the kernels take; more rows are a GEMM, cuBLAS's business
MAX_WEIGHTS = 3  # weights per launch (q, k, v)
# transformers' activation names -> the epilogue's activation id (0 silu, 1 gelu tanh, 2 gelu exact)
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit
def _activation(g, ACT: tl.constexpr):
    """act(g) for fp32 g: silu, gelu (tanh approximation) or exact gelu; tanh and sigmoid via tl.exp."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        c = 0.7978845608028654  # sqrt(2/pi)
        t = 2.0 / (1.0 + tl.exp(-2.0 * c * (g + 0.044715 * g * g * g))) - 1.0
        return 0.5 * g * (1.0 + t)
    else:
        return g * 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))


@jit
def _store_rows(OUT, acc, rows, M, N, MP: tl.constexpr, RES, RESIDUAL: tl.constexpr):
    """acc (MP, BN) fp32 -> OUT (M, N) rows [0, M), columns `rows` (BN,), in OUT's dtype. RESIDUAL:
    OUT = RES + acc, acc rounded to OUT's dtype first (as `x + h` of the rounded h adds)."""
    m = tl.arange(0, MP)
    mask = (m[:, None] < M) & (rows[None, :] < N)
    offs = m[:, None] * N + rows[None, :]
    if RESIDUAL:
        acc = acc.to(OUT.dtype.element_ty).to(tl.float32) + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@jit
def _dense_tile(X, W, rows, M, N, K, eps, NORM_W, norm_offset, MP: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                NORM: tl.constexpr):  # fmt: skip
    """x (M, K) . W[rows] (BN, K)^T -> (MP, BN) fp32 (rows past N read row N - 1; the store masks them).

    NORM: the product is of RMSNorm(x) = x * rstd * (NORM_W + norm_offset): the loop multiplies x by
    (NORM_W + norm_offset) and sums x^2 as it goes, and rstd scales each row's sums at the end (a
    per-row factor), so no program waits on a pass over x first; the normalised x is never rounded
    to x's dtype (it never exists), which the unfused path does once."""
    m = tl.arange(0, MP)
    kk = tl.arange(0, BK)
    safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
    w_ptr = W + safe_rows[:, None] * K + kk[None, :]  # (BN, BK)
    x_ptr = X + m[:, None] * K + kk[None, :]  # (MP, BK)
    m_ok = m[:, None] < M
    acc = tl.zeros((MP, BN), dtype=tl.float32)
    squares = tl.zeros((MP,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            w = tl.load(w_ptr)
            x = tl.load(x_ptr, mask=m_ok, other=0.0)
            if NORM:
                scale = tl.load(NORM_W + k0 + kk).to(tl.float32) + norm_offset
        else:
            k_ok = (k0 + kk)[None, :] < K
            w = tl.load(w_ptr, mask=k_ok, other=0.0)
            x = tl.load(x_ptr, mask=m_ok & k_ok, other=0.0)
            if NORM:
                scale = tl.load(NORM_W + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32) + norm_offset
        if NORM:
            x = x.to(tl.float32)
            squares += tl.sum(x * x, axis=1)
            x = x * scale[None, :]
            if DOT:
                x = x.to(X.dtype.element_ty)
        if DOT:
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        w_ptr += BK
        x_ptr += BK
    if NORM:
        acc = acc * tl.rsqrt(squares / K + eps)[:, None]
    return acc


@jit
def _gemv_kernel(
    X, W0, W1, W2, OUT0, OUT1, OUT2,  # X (M, K); W_i (N_i, K); OUT_i (M, N_i); unused slots repeat slot 0
    M, N0, N1, N2, K, T0, T1,  # T_i: programs of weight i (the grid is T0 + T1 + T2)
    NORM_W, eps, norm_offset,  # NORM: x is RMS-normalised with weight NORM_W (K,) first
    RES,  # RESIDUAL (one weight): OUT0 = RES (M, N0) + x W0^T
    MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
    IEEE: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if GLU:  # W0 = gate, W1 = up (N0 rows each) -> OUT0 = act(x W0^T) * (x W1^T)
        rows = pid * BN + tl.arange(0, BN)
        g = _dense_tile(X, W0, rows, M, N0, K, eps, NORM_W, norm_offset, MP, BN, BK, EVEN_K, DOT, IEEE, NORM)
        u = _dense_tile(X, W1, rows, M, N0, K, eps, NORM_W, norm_offset, MP, BN, BK, EVEN_K, DOT, IEEE, NORM)
        g = g.to(OUT0.dtype.element_ty).to(tl.float32)  # rounded as the unfused path's outputs are
        u = u.to(OUT0.dtype.element_ty).to(tl.float32)
        _store_rows(OUT0, _activation(g, ACT) * u, rows, M, N0, MP, OUT0, False)
    elif pid < T0:
        rows = pid * BN + tl.arange(0, BN)
        acc = _dense_tile(X, W0, rows, M, N0, K, eps, NORM_W, norm_offset, MP, BN, BK, EVEN_K, DOT, IEEE, NORM)
        _store_rows(OUT0, acc, rows, M, N0, MP, RES, RESIDUAL)
    elif pid < T0 + T1:
        rows = (pid - T0) * BN + tl.arange(0, BN)
        acc = _dense_tile(X, W1, rows, M, N1, K, eps, NORM_W, norm_offset, MP, BN, BK, EVEN_K, DOT, IEEE, NORM)
        _store_rows(OUT1, acc, rows, M, N1, MP, OUT1, False)
    else:
        rows = (pid - T0 - T1) * BN + tl.arange(0, BN)
        acc = _dense_tile(X, W2, rows, M, N2, K, eps, NORM_W, norm_offset, MP, BN, BK, EVEN_K, DOT, IEEE, NORM)
        _store_rows(OUT2, acc, rows, M, N2, MP, OUT2, False)


def gemv_reference(x: torch.Tensor, weights, activation: str | None = None, norm=None, residual=None
                   ) -> list[torch.Tensor]:  # fmt: skip
    """x (M, K), weights [(N_i, K)] -> [x W_i^T (M, N_i)]; with `activation`: weights = (gate, up)
    -> [act(x gate^T) * (x up^T)], the activations as transformers computes them. `norm`: (weight
    (K,), eps, offset): x is RMS-normalised first (rms_norm_reference, one rounding). `residual`
    (M, N) with one weight: [residual + x W^T]."""
    if norm is not None:
        x = rms_norm_reference(x, norm[0], norm[1], norm[2])
    outs = [x @ w.t() for w in weights]
    if residual is not None:
        return [residual + outs[0]]
    if activation is None:
        return outs
    gate, up = outs
    if ACTIVATIONS[activation] == 0:
        return [F.silu(gate) * up]
    return [F.gelu(gate, approximate="tanh" if ACTIVATIONS[activation] == 1 else "none") * up]


# Launch shapes: (BLOCK_N, BLOCK_K, num_warps, DOT), module-level so the bench can sweep them. The
# best of bench/bench_gemv.py's sweep on the H200 at M = 1 (BENCHMARKS.md): q/k/v 3.4 TB/s and o 3.1
# with (2, 4096) (cuBLAS: 1.8 and 2.5), down (K = 14336) 3.9 with (8, 2048) (cuBLAS 3.6), gate/up with
# the GLU epilogue 4.2 with (4, 4096) (cuBLAS + the GLU kernel: 3.6). Whole rows of K = 4096 in one
# tile: each program issues all its loads at once, which is what a latency-bound GEMV needs.
# Launches with the fused RMSNorm ("*_norm": q/k/v and gate/up in a decode step) read x and the norm
# weight once per program from L2, so taller programs pay there: (8, 4096, 8 warps) made the 8B
# batch-1 step 4.43 ms against 4.71 with the shapes above (BENCHMARKS.md, same run).
CONFIG = {"dense": (2, 4096, 4, False), "dense_long_k": (8, 2048, 4, False), "glu": (4, 4096, 4, False),
          "dense_norm": (8, 4096, 8, False), "glu_norm": (8, 4096, 8, False)}
LONG_K = 8192  # from this K on, "dense_long_k"


def norm_arguments(norm, x: torch.Tensor) -> tuple:
    """The kernels' (NORM_W, eps, norm_offset) arguments: the norm's, or placeholders (x, 0.0, 0.0)."""
    if norm is None:
        return x, 0.0, 0.0
    weight, eps, offset = norm
    return weight, float(eps), float(offset)


def check_inputs(x: torch.Tensor, weights, activation: str | None, name: str, norm=None, residual=None) -> None:
    """Errors naming the argument and the fix, shared by the dense and NF4 launchers."""
    if residual is not None and (len(weights) != 1 or activation is not None or residual.dim() != 2
                                 or residual.shape[0] != x.shape[0] or residual.dtype != x.dtype):
        raise ValueError(f"{name}: residual must be (M, N) in x's dtype, with one weight and no activation")
    if norm is not None and (len(norm) != 3 or norm[0].shape != (x.shape[-1],) or norm[0].device != x.device):
        raise ValueError(f"{name}: norm must be (weight ({x.shape[-1]},) on {x.device}, eps, offset)")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name}: x must be (M, K) with 1 <= M <= {MAX_ROWS}, got {tuple(x.shape)}; larger "
                         "batches are matrix products (torch.matmul)")
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"{name}: 1..{MAX_WEIGHTS} weights per launch, got {len(weights)}")
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation={activation!r} has no epilogue (known: {', '.join(ACTIVATIONS)})")
        if len(weights) != 2:
            raise ValueError(f"{name}: an activation needs exactly the (gate, up) weights, got {len(weights)}")


def gemv(x: torch.Tensor, weights, activation: str | None = None, use_triton: bool | None = None,
         norm=None, residual: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """x (M, K) and dense weights [(N_i, K)] in x's dtype -> [x W_i^T (M, N_i)], one launch.

    With `activation` (a key of ACTIVATIONS) the weights are (gate, up) of equal shape and the
    result is [act(x gate^T) * (x up^T)] (M, N). `norm` = (weight (K,), eps, offset): the
    projections read RMSNorm(x) (the decoder's pre-norm, fused: it is never written). `residual`
    (M, N), one weight: the result is residual + x W^T (the decoder's residual add). No autograd."""
    check_inputs(x, weights, activation, "gemv", norm, residual)
    K = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"gemv: weight {i} must be (N, {K}) {x.dtype} on {x.device}, got "
                             f"{tuple(w.shape)} {w.dtype} on {w.device}")
    if activation is not None and weights[0].shape != weights[1].shape:
        raise ValueError(f"gemv: gate {tuple(weights[0].shape)} and up {tuple(weights[1].shape)} differ in shape")
    if x.dtype not in _DTYPES or not should_use_triton(x, use_triton):
        return gemv_reference(x, weights, activation, norm, residual)
    x = x.contiguous()
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    M = x.shape[0]
    base = "glu" if activation is not None else "dense"
    key = base + ("_norm" if norm is not None else "_long_k" if K >= LONG_K and activation is None else "")
    BN, BK, warps, dot = CONFIG.get(key, CONFIG[base])
    BK = min(BK, max(16, next_power_of_2(K)))
    MP = max(16, next_power_of_2(M)) if dot else next_power_of_2(M)
    ns = [w.shape[0] for w in weights]
    if activation is not None:
        outs = [torch.empty(M, ns[0], dtype=x.dtype, device=x.device)]
        tiles, grid = [-(-ns[0] // BN), 0], -(-ns[0] // BN)
    else:
        outs = [torch.empty(M, n, dtype=x.dtype, device=x.device) for n in ns]
        tiles = [-(-n // BN) for n in ns]
        grid = sum(tiles)
    pad = MAX_WEIGHTS - len(weights)
    ws, os_, ns = weights + [weights[0]] * pad, outs + [outs[0]] * (MAX_WEIGHTS - len(outs)), ns + [ns[0]] * pad
    kernel_for(_gemv_kernel)[(grid,)](
        x, *ws, *os_, M, *ns, K, tiles[0], tiles[1] if len(tiles) > 1 else 0, *norm_arguments(norm, x),
        x if residual is None else residual.contiguous(),
        MP=MP, BN=BN, BK=BK, EVEN_K=K % BK == 0, DOT=dot, IEEE=x.dtype == torch.float32,
        GLU=activation is not None, ACT=ACTIVATIONS.get(activation, 0), NORM=norm is not None,
        RESIDUAL=residual is not None, num_warps=warps,
    )  # fmt: skip
    return outs
