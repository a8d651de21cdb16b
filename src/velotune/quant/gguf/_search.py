"""llama.cpp's per-sub-block scale searches (ggml-quants.c), vectorised over sub-blocks.

Layout: sub-blocks are columns, ``x`` is (n, M) for M sub-blocks of n values, so that every
per-position step works on a contiguous row and sums run in C's order (``seq_sum``). Each
function reproduces the C function's float32 arithmetic and candidate order: the ~20 candidates
are a Python loop, the sub-blocks never are. The result is bit-identical to llama.cpp's
reference quantizers (the tests check the bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from velotune.quant.gguf._bits import fdiv, first_absmax, nearest_int, seq_sum

GROUP_MAX_EPS = 1e-15


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search (Q2_K/Q4_K/Q5_K): x ~ scale * L - the_min, L in 0..nmax.

    x, weights: (n, M). Returns scale (M,), the_min (M,) (>= 0) and L (n, M) int32. Tries
    nstep + 1 inverse scales (rmin + rdelta * i + nmax) / (max - min), each refined by weighted
    least squares for scale and min, and keeps the lowest weighted error (strictly lower wins).
    As in ggml, ``min`` is the best min found so far: later candidates round x - min with it.
    """
    lo = torch.clamp(x.amin(dim=0), max=0.0)  # (M,) min, clamped to <= 0
    hi = x.amax(dim=0)  # (M,)
    sum_w = seq_sum(weights)  # (M,)
    sum_x = seq_sum(weights * x)  # (M,)
    flat = hi == lo
    one = torch.ones_like(hi)
    # (n, M) buffers reused by every candidate: the loop is memory-bound, and a fresh large
    # tensor per operation costs more (page faults) than the arithmetic itself
    scratch, lv_buf, wl_buf = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def quantized_levels(iscale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """clamp(nearest_int(iscale * (x - mn)), 0, nmax) as float32 (n, M)."""
        lv = torch.sub(x, mn, out=out) if out is not None else x - mn
        return lv.mul_(iscale).round_().clamp_(0, nmax)

    def err(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = torch.mul(scale, lv, out=scratch).add_(mn).sub_(x)  # scale * L + min - x, (n, M)
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return seq_sum(diff.mul_(weights))  # (M,)

    iscale = fdiv(float(nmax), torch.where(flat, one, hi - lo))
    best_scale = fdiv(1.0, iscale)
    best_min = lo
    # the winner's levels are recomputed once at the end from the (iscale, min) that made them
    best_iscale, best_from = iscale, lo
    best_err = err(best_scale, best_min, quantized_levels(iscale, lo, out=lv_buf))
    for step in range(nstep + 1):
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = fdiv(factor, torch.where(flat, one, hi - best_min))  # (M,) (max - current min)
        from_min = best_min
        laf = quantized_levels(iscale, from_min, out=lv_buf)  # (n, M)
        wl = torch.mul(weights, laf, out=wl_buf)
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(torch.mul(wl, laf, out=scratch))
        sum_xl = seq_sum(wl.mul_(x))
        det = sum_w * sum_l2 - sum_l * sum_l  # (M,)
        ok = det > 0
        safe_det = torch.where(ok, det, one)
        this_scale = fdiv(sum_w * sum_xl - sum_x * sum_l, safe_det)
        this_min = fdiv(sum_l2 * sum_x - sum_l * sum_xl, safe_det)
        positive = this_min > 0
        this_scale = torch.where(positive, fdiv(sum_xl, torch.where(sum_l2 != 0, sum_l2, one)), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = err(this_scale, this_min, laf)
        take = ok & (cur < best_err)
        best_err = torch.where(take, cur, best_err)
        best_scale = torch.where(take, this_scale, best_scale)
        best_min = torch.where(take, this_min, best_min)
        best_iscale = torch.where(take, iscale, best_iscale)
        best_from = torch.where(take, from_min, best_from)
    scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    the_min = -torch.where(flat, lo, best_min)
    levels = quantized_levels(best_iscale, best_from)
    levels = torch.where(flat, torch.zeros_like(levels), levels).to(torch.int32)
    return scale, the_min, levels


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with weights x^2 (Q6_K, ``rmse_type = 1``): x ~ scale * (L - nmax).

    x: (n, M). Returns scale (M,) and L (n, M) int32 in 0..2*nmax-1. Starts at -nmax / max and
    tries 18 more inverse scales -(nmax + 0.1 i) / max, i = -9..9, keeping the best least-squares fit.
    """
    amax, signed_max = first_absmax(x.T)
    zero = amax < GROUP_MAX_EPS  # (M,)
    one = torch.ones_like(amax)
    safe_max = torch.where(zero, one, signed_max)
    w = x * x  # (n, M)
    wx = w * x

    scratch, lv_buf = torch.empty_like(x), torch.empty_like(x)  # reused (see make_qkx2_quants)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels clamp(nearest_int(iscale * x), -nmax, nmax - 1) as float32 (n, M), sum w x l, sum w l l."""
        lv = torch.mul(x, iscale, out=lv_buf).round_().clamp_(-nmax, nmax - 1)
        sumlx = seq_sum(torch.mul(wx, lv, out=scratch))
        suml2 = seq_sum(torch.mul(w, lv, out=scratch).mul_(lv))
        return lv, sumlx, suml2

    best_iscale = fdiv(float(-nmax), safe_max)
    _, sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 != 0, fdiv(sumlx, torch.where(suml2 != 0, suml2, one)), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        iscale = fdiv(factor, safe_max)
        _, sumlx, suml2 = fit(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(take, iscale, best_iscale)
        scale = torch.where(take, fdiv(sumlx, torch.where(suml2 > 0, suml2, one)), scale)
        best = torch.where(take, scale * sumlx, best)
    levels = fit(best_iscale)[0] + nmax  # the winner's levels, recomputed once (a new tensor)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.zeros_like(levels), levels).to(torch.int32)
    return scale, levels


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's symmetric search with weights x^2 and coordinate descent (``do_rmse = true``).

    x: (n, M). Returns scale (M,) and L (n, M) int32 in 0..2*nmax-1. Starts from -nmax / max,
    then up to 5 sweeps move single levels when that raises sumlx^2 / suml2.
    """
    amax, signed_max = first_absmax(x.T)
    zero = amax < GROUP_MAX_EPS
    one = torch.ones_like(amax)
    iscale = fdiv(float(-nmax), torch.where(zero, one, signed_max))
    lv = torch.clamp(nearest_int(iscale * x), -nmax, nmax - 1).to(torch.float32)  # (n, M)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * lv)  # (M,)
    suml2 = seq_sum((w * lv) * lv)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            wi, li, wxi = w[i], lv[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            active = slx > 0
            new_l = torch.clamp(nearest_int(fdiv(x[i] * sl2, torch.where(active, slx, one))), -nmax, nmax - 1)
            new_l = new_l.to(torch.float32)
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + (wi * new_l) * new_l
            accept = (active & (new_l != li) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            lv[i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, fdiv(sumlx, torch.where(suml2 > 0, suml2, one)), torch.zeros_like(sumlx))
    levels = lv.to(torch.int32) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    return scale, levels
