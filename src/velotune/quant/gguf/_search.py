"""llama.cpp's per-sub-block scale searches (ggml-quants.c), vectorised over sub-blocks.

Each function takes many sub-blocks at once, ``x`` (M, n) float32, and reproduces the C
function's arithmetic in float32 and its candidate order: the candidates are looped over in
Python (about 20 iterations), the sub-blocks never are. Sums use torch's reduction order
instead of C's left-to-right one, so a near-tie can rarely resolve differently (the error of
either choice is then the same to float precision).
"""

from __future__ import annotations

import numpy as np
import torch

from velotune.quant.gguf._bits import first_absmax, nearest_int

GROUP_MAX_EPS = 1e-15


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search (Q2_K/Q4_K/Q5_K): x ~ scale * L - the_min, L in 0..nmax.

    x, weights: (M, n). Returns scale (M,), the_min (M,) (>= 0) and L (M, n) int32. Tries
    nstep + 1 inverse scales (rmin + rdelta * i + nmax) / (max - min), each refined by weighted
    least squares for scale and min, and keeps the lowest weighted error (strictly lower wins).
    """
    lo = torch.clamp(x.amin(dim=1), max=0.0)  # (M,)  min, clamped to <= 0
    hi = x.amax(dim=1)  # (M,)
    sum_w = weights.sum(dim=1)  # (M,)
    sum_x = (weights * x).sum(dim=1)  # (M,)
    flat = hi == lo
    rng = torch.where(flat, torch.ones_like(hi), hi - lo)  # (M,)
    xm = x - lo[:, None]  # (M, n)

    def err(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * lv + mn[:, None] - x  # (M, n)
        diff = diff.abs() if use_mad else diff * diff
        return (weights * diff).sum(dim=1)  # (M,)

    iscale = nmax / rng
    best_scale = 1 / iscale
    best_min = lo
    levels = torch.clamp(nearest_int(iscale[:, None] * xm), 0, nmax)  # (M, n) int32
    best_err = err(best_scale, best_min, levels.to(torch.float32))
    for step in range(nstep + 1):
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = factor / rng
        la = torch.clamp(nearest_int(iscale[:, None] * xm), 0, nmax)  # (M, n) int32
        laf = la.to(torch.float32)
        wl = weights * laf
        sum_l = wl.sum(dim=1)
        sum_l2 = (wl * laf).sum(dim=1)
        sum_xl = (wl * x).sum(dim=1)
        det = sum_w * sum_l2 - sum_l * sum_l  # (M,)
        ok = det > 0
        safe_det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        safe_l2 = torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(positive, sum_xl / safe_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = err(this_scale, this_min, laf)
        take = ok & (cur < best_err)
        levels = torch.where(take[:, None], la, levels)
        best_err = torch.where(take, cur, best_err)
        best_scale = torch.where(take, this_scale, best_scale)
        best_min = torch.where(take, this_min, best_min)
    scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    the_min = -torch.where(flat, lo, best_min)
    levels = torch.where(flat[:, None], torch.zeros_like(levels), levels)
    return scale, the_min, levels


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with weights x^2 (Q6_K, ``rmse_type = 1``): x ~ scale * (L - nmax).

    x: (M, n). Returns scale (M,) and L (M, n) int32 in 0..2*nmax-1. Starts at -nmax / max and
    tries 18 more inverse scales -(nmax + 0.1 i) / max, i = -9..9, keeping the best least-squares fit.
    """
    amax, signed_max = first_absmax(x)
    zero = amax < GROUP_MAX_EPS  # (M,)
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x  # (M, n)
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)  # (M, n)
        lf = lv.to(torch.float32)
        return lv, (wx * lf).sum(dim=1), ((w * lf) * lf).sum(dim=1)

    lv, sumlx, suml2 = fit(-nmax / safe_max)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    levels = lv + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        lv, sumlx, suml2 = fit(factor / safe_max)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        levels = torch.where(take[:, None], lv + nmax, levels)
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero[:, None], torch.zeros_like(levels), levels)
    return scale, levels


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's symmetric search with weights x^2 and coordinate descent (``do_rmse = true``).

    x: (M, n). Returns scale (M,) and L (M, n) int32 in 0..2*nmax-1. Starts from -nmax / max,
    then up to 5 sweeps move single levels when that raises sumlx^2 / suml2.
    """
    amax, signed_max = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    iscale = -nmax / safe_max
    lv = torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1).to(torch.float32)  # (M, n)
    w = x * x
    wx = w * x
    sumlx = (wx * lv).sum(dim=1)  # (M,)
    suml2 = ((w * lv) * lv).sum(dim=1)
    n = x.shape[1]
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            wi, xi, li, wxi = w[:, i], x[:, i], lv[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            active = slx > 0
            safe_slx = torch.where(active, slx, torch.ones_like(slx))
            new_l = torch.clamp(nearest_int(xi * sl2 / safe_slx), -nmax, nmax - 1).to(torch.float32)
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + (wi * new_l) * new_l
            accept = (active & (new_l != li) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            lv[:, i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    levels = lv.to(torch.int32) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero[:, None], torch.zeros_like(levels), levels)
    return scale, levels
