"""FP8 storage of frozen base weights: e4m3 values with one fp32 scale per output row.

Why row-wise: `torch._scaled_mm` runs e4m3 GEMMs with one scale per row of each operand at
1.64-1.70x bf16's speed on the H200 (ANCHORS.md), and a row-scaled weight serves both GEMMs of a
frozen projection without a second copy: forward y = x W^T takes W's row scales as the output
columns' scales, and backward dX = dY W folds them into dY's columns before dY is quantized (see
fast/fp8_matmul.py). Memory: 1 byte per weight plus 4 bytes per row, half of bf16.

`FP8Linear` subclasses nn.Linear so PEFT wraps it with its plain LoRA layer (and creates the
adapters in `compute_dtype`, which PEFT reads as it does for bitsandbytes layers). Its own
forward dequantizes to 16-bit (the exact reference of the FP8 values); the FP8 GEMMs run on the
fast path, where the step plan decides them (fast/plan.py). Merging an adapter into an FP8 weight
is not supported (PEFT would add in the scaled FP8 units): merge into the 16-bit checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8 import FP8_DTYPE, quantize_fp8_rows_reference

MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have e4m3 tensor cores


def fp8_unavailable(device: torch.device | str) -> str | None:
    """None when FP8 GEMMs can run on `device`, else why not (for notices and errors)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the model is on {device.type}; FP8 GEMMs run on CUDA GPUs of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"the GPU ({name}) has compute capability {major}.{minor}; FP8 tensor cores need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    return None


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (e4m3 (out, in), scale (out,) fp32) with weight ~= e4m3 * scale[:, None]."""
    values, scale = quantize_fp8_rows_reference(weight.detach())  # (out, in) e4m3, (out, 1)
    return values, scale.reshape(-1)


class FP8Linear(nn.Linear):
    """A frozen Linear whose weight is stored as e4m3 values (`weight`) and row scales (`weight_scale`)."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a throwaway float weight
        self.out_features, self.in_features = values.shape
        self.weight = nn.Parameter(values, requires_grad=False)  # (out, in) e4m3
        self.register_buffer("weight_scale", scale)  # (out,) fp32
        self.bias = bias
        self.compute_dtype = compute_dtype

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default `compute_dtype`): fp32 product, one cast."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized(dtype), bias)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype conversions (`model.to(torch.bfloat16)`, `.half()`) change the
        compute dtype and leave the FP8 values and fp32 scales as they are. Without this, Module.to
        would cast the e4m3 values (floating point to torch) into the new dtype without their scales."""
        values, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            device = self.weight.device
            if self.weight.dtype.is_floating_point:
                self.compute_dtype = self.weight.dtype
            self.weight.data = values.to(device)
            self.weight_scale = scale.to(device=device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "fp8=e4m3")


def to_fp8_linear(linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> FP8Linear:
    """An FP8Linear on `linear`'s device with its weight quantized row-wise and its bias kept."""
    values, scale = quantize_weight_fp8(linear.weight)
    module = FP8Linear(values, scale, linear.bias, compute_dtype or linear.weight.dtype)
    module.train(linear.training)
    return module


def quantize_model_fp8_(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",),
                        compute_dtype: torch.dtype | None = None, within: str = "") -> list[str]:
    """Replace every nn.Linear of `model` (in place, one at a time) by an FP8Linear; return their names.

    The embeddings are not Linear modules and stay 16-bit; `skip_modules` (dotted components, as
    quant/linear.py) keeps lm_head and anything a checkpoint kept in 16-bit. `within`: only that
    submodule's Linears (full names; see quant/linear.py's `quantize_model_`).
    """
    from .linear import _skipped, is_linear4bit

    skip = tuple(skip_modules)
    names = [name for name, module in model.get_submodule(within).named_modules(prefix=within)
             if isinstance(module, nn.Linear) and not isinstance(module, FP8Linear)
             and not is_linear4bit(module) and not _skipped(name, skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, to_fp8_linear(old, compute_dtype))
        old.weight = None  # the 16-bit weight is released now, not after the loop
        del old
    return names


def is_fp8_weight(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dtype == FP8_DTYPE
