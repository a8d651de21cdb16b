"""8-bit blockwise quantization with bitsandbytes' dynamic map, in pure torch.

NF4 "double quantization" stores the per-block absmax of the 4-bit weights as 8-bit codes of
this type (block 256, after subtracting their mean). Only that use is needed here, so this file
implements exactly what bitsandbytes does for it and nothing more.

bitsandbytes has two quantizers for this step that do not always agree:
  * the CUDA kernel (``kQuantizeBlockwise`` -> ``dQuantize<0>``): a 7-step binary search over the
    256 sorted codes, then a midpoint comparison, giving the nearest code;
  * the CPU kernel of bitsandbytes >= 0.50 (``quantize_cpu_impl``): the normalised value is
    snapped to one of 65536 evenly spaced points on [-1, 1] and looked up in a table that was
    built from those points, so values within ~1.5e-5 of a midpoint (and the dense codes near
    zero) can land on a neighbouring code.
``rounding="nearest"`` reproduces the first, ``rounding="cpu-lut"`` the second, and ``"auto"``
picks the one bitsandbytes itself would run for the tensor's device, so our output is
bit-identical to ``bitsandbytes.functional.quantize_4bit`` wherever both run.
"""

from __future__ import annotations

import torch

_LUT_SIZE = 65536  # bitsandbytes csrc/cpu_ops.cpp: kLUTSize


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit "dynamic" code of bitsandbytes (``create_dynamic_map()``), shape (256,).

    For each decimal exponent e = -6..0 the interval [0.1, 1] is split into 2**i equal parts whose
    midpoints (times 10**e, both signs) are codes; 0 and 1 complete the 256 values. Computed in
    the same precision steps as bitsandbytes (float32 linspace, midpoints and products), so the
    result is bit-identical.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        n_edges = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0  # fp32
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    if len(values) != 2**total_bits:  # the layout only works out for the (7, 8) default
        raise ValueError(f"dynamic map has {len(values)} codes, expected {2**total_bits}")
    return torch.tensor(values, dtype=torch.float32)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten to fp32 and zero-pad to whole blocks: (n,) -> (n_blocks, blocksize)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _nearest_binary_search(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Vectorised copy of the CUDA ``dQuantize<0>``: same pivots, same tie-breaking.

    A NaN input (an all-zero block, 0 * inf) fails every ``>`` and ends on code 0, as on CUDA.
    """
    pivot = torch.full_like(scaled, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(scaled, -1.0)
    upper = torch.full_like(scaled, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        go_up = scaled > val
        lower_pivot = torch.where(go_up, pivot, lower_pivot)
        lower = torch.where(go_up, val, lower)
        upper_pivot = torch.where(go_up, upper_pivot, pivot)
        upper = torch.where(go_up, upper, val)
        pivot = pivot + torch.where(go_up, step, -step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = scaled > val
    pick_up = torch.where(scaled > (upper + val) * 0.5, upper_pivot, pivot)
    pick_down = torch.where(scaled < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(above, pick_up, pick_down)


def _cpu_lut(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU rule: snap to 65536 grid points on [-1, 1], then a prebuilt table."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,) fp32
    steps = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * steps) / float(_LUT_SIZE - 1)
    table = torch.bucketize(grid, midpoints)  # count of midpoints < grid point
    v = scaled.nan_to_num(0.0).clamp(-1.0, 1.0)  # NaN only in all-zero blocks, overwritten below
    # (v + 1) * 0.5 * 65535 + 0.5; the last multiply-add is fused (FMA) in the compiled kernel:
    # exact product in fp64, one rounding to fp32, then C's truncating cast to uint16.
    half = (v + 1.0) * 0.5
    idx = (half.double() * float(_LUT_SIZE - 1) + 0.5).float().long()
    return table[idx]


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, rounding: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 8-bit quantization: returns (codes uint8 shaped like x, absmax fp32 (n_blocks,))."""
    if rounding == "auto":
        rounding = "cpu-lut" if x.device.type == "cpu" else "nearest"
    code = code.to(device=x.device, dtype=torch.float32)
    n = x.numel()
    blocks = _blocks(x, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1.0 / absmax).unsqueeze(1)  # CUDA and CPU both multiply by the reciprocal
    if rounding == "nearest":
        q = _nearest_binary_search(scaled, code)
    elif rounding == "cpu-lut":
        q = _cpu_lut(scaled, code)
        q = torch.where((absmax == 0).unsqueeze(1), 0, q)  # the CPU kernel writes 0 for such blocks
    else:
        raise ValueError(f"rounding must be 'auto', 'nearest' or 'cpu-lut', got {rounding!r}")
    return q.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: code[q] * absmax of its block, fp32, shaped like q."""
    n = q.numel()
    values = code.to(q.device, torch.float32)[q.reshape(-1).long()]  # (n,)
    block_of = torch.arange(n, device=q.device) // blocksize
    return (values * absmax.float()[block_of]).reshape(q.shape)
