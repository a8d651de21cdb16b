"""The frozen base matmuls of a fused LoRA projection as FP8 (e4m3) GEMMs with row-wise scales.

Forward, y = x W^T: x is quantized per token row (kernels/fp8.py, one pass) and
`torch._scaled_mm(x8, W8^T, scale_a=s_x (N, 1), scale_b=s_W (1, out))` gives y in bf16.

Backward, dX = dY W: the contraction runs over W's rows, the very axis W's row scales s_W vary
along, so they cannot be applied after the GEMM. They are folded into dY instead:
dX = (dY diag(s_W)) W8, and dY diag(s_W) is what gets quantized per row (the same kernel with a
column scale), so the GEMM is `_scaled_mm(q(dY s_W), W8, scale_a=s_g, scale_b=1)`. The weight is
used as stored: no second, column-scaled copy (that would double FP8 storage) and no block-wise
scales (which the row-wise `_scaled_mm` path does not take). The price is layout: cuBLAS' FP8 GEMM
wants the second operand column-major, W8^T for forward (free: a view of the row-major W8) and
W8 for backward (a transposed copy of 1 byte per value, made per backward and dropped). That copy is
written by our kernels, not by `.t().contiguous()` (PyTorch's byte-wise copy ran at ~0.35 TB/s on
the H200: 0.34 ms for a 14336 x 4096 weight): FP8 storage through the tiled transpose of
kernels/fp8_transpose.py, NF4 dequantized straight into the transposed layout
(kernels/nf4_fp8_transposed.py), so the NF4 backward never transposes.

Where the FP8 values come from (`fp8_weight`): FP8 storage (quant/fp8.py FP8Linear) as is; NF4
dequantized straight to e4m3 with its cached row scales (kernels/nf4_fp8.py); a 16-bit weight
quantized row-wise on the fly. Only the frozen base GEMMs change: LoRA, norms, attention, the
loss and the optimizer keep their 16/32-bit paths, and the saved x stays 16-bit for dA.
"""

from __future__ import annotations

import torch

from ..kernels.fp8 import FP8_DTYPE, quantize_fp8_rows
from ..kernels.fp8_transpose import transpose_bytes
from ..kernels.nf4_fp8 import dequantize_nf4_to_fp8

_OUT_DTYPE = torch.bfloat16  # row-wise _scaled_mm writes bf16 on CUDA; other compute dtypes are cast after
_ONES: dict[tuple, torch.Tensor] = {}


def _is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None and type(weight).__name__ == "Params4bit"


def fp8_weight(p, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection `p` (lora_linear.LoraProjection) -> (e4m3 W8, row scales (out,) fp32).

    W8 is (out, in) row-major, or with `transposed` its (in, out) row-major copy (backward's layout).
    """
    weight = p.weight
    if _is_4bit(weight):
        return dequantize_nf4_to_fp8(weight, transposed=transposed)  # written in the asked layout
    if weight.dtype == FP8_DTYPE:
        values, scale = weight, p.weight_scale
    else:
        values, scale = quantize_fp8_rows(weight.detach())  # (out, in), (out, 1)
        scale = scale.reshape(-1)
    return (transpose_bytes(values) if transposed else values), scale


def _ones(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones((1, n), dtype=torch.float32, device=device)
    return ones


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, in) -> (e4m3 (N, in), scales (N, 1)): once per group of projections sharing x."""
    return quantize_fp8_rows(x)


def fp8_linear(x8: torch.Tensor, x_scale: torch.Tensor, p, dtype: torch.dtype) -> torch.Tensor:
    """x8 (N, in) e4m3 with scales (N, 1) -> x W^T + b (N, out) in `dtype` through one FP8 GEMM."""
    values, scale = fp8_weight(p)  # (out, in), (out,)
    out = _scaled_mm(x8, values.t(), x_scale, scale.view(1, -1))
    if out.dtype != dtype:
        out = out.to(dtype)
    if p.bias is not None:
        out.add_(p.bias.to(dtype))
    return out  # (N, out)


def fp8_grad_input(grad: torch.Tensor, p, dtype: torch.dtype) -> torch.Tensor:
    """dY (N, out) -> dY W (N, in) in `dtype`: dY's columns scaled by W's row scales, quantized per row."""
    values_t, scale = fp8_weight(p, transposed=True)  # (in, out) row-major, (out,)
    g8, g_scale = quantize_fp8_rows(grad, col_scale=scale)  # (N, out) e4m3, (N, 1)
    out = _scaled_mm(g8, values_t.t(), g_scale, _ones(values_t.shape[0], grad.device))  # (N, in)
    return out if out.dtype == dtype else out.to(dtype)


def _scaled_mm(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """(M, K) e4m3 x (K, N) e4m3 with row scales (M, 1) and column scales (1, N) -> (M, N) bf16.

    On GPUs cuBLAS' FP8 GEMM. On the CPU the same product of the dequantized operands in fp32, rounded to
    bf16 once: the CPU `_scaled_mm` of some torch releases (2.11) takes per-tensor scales only."""
    if a8.device.type == "cuda":
        return torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=_OUT_DTYPE)
    return ((a8.float() * scale_a) @ (b8.float() * scale_b)).to(_OUT_DTYPE)


def fp8_shape_reason(p) -> str | None:
    """None when the projection's shape suits the FP8 GEMMs, else why (both dims multiples of 16)."""
    out_features, in_features = _shape(p.weight)
    if in_features % 16 or out_features % 16:
        return (f"shape (out={out_features}, in={in_features}) is not a multiple of 16 in both dimensions "
                "(FP8 GEMMs need it)")
    return None


def _shape(weight) -> tuple[int, int]:
    state = getattr(weight, "quant_state", None)
    if state is not None and _is_4bit(weight):
        return tuple(state.shape)
    return tuple(weight.shape)
