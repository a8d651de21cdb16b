"""Dynamic 4-bit: which linear layers stay in 16-bit, chosen by their measured NF4 error.

Why measured on activations: rounding a weight to NF4 hurts in proportion to what flows through
it. A layer's output error on real inputs X is ||X (W - Q(W))^T||^2, i.e. the weight error seen
through the second moment of its inputs, so a weight whose large errors sit on input channels that
carry large activations matters far more than its plain weight error says. The choice ranks by
this absolute error per token (`velotune/quantize.py` says why, with the measurement); the relative
form ||X (W - Q)^T||^2 / ||X W^T||^2 is reported beside it.

Why hooks that compute the error directly instead of collecting X^T X per layer: the Gram matrices
of an 8B model's down projections alone (14336^2 floats, 32 layers) take 26 GB; each hook instead
quantizes its weight once per calibration batch and multiplies, which costs one extra matmul.

This file is the arithmetic (error meter, sizes, the choice under a budget); running calibration text
through a model and writing the folder is `velotune.quantize`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from velotune.quant.blockwise8 import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit
from velotune.quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE, _nf4_codes, _resolve_backend

# bnb-4bit tensors per weight besides the packed codes: quant_map (16 fp32), nested_quant_map (256 fp32),
# nested_absmax (fp32 per 256 blocks) and the JSON quant_state (about 170 bytes; counted as 176).
_FIXED_NF4_BYTES = 16 * 4 + 256 * 4 + 176


def nf4_nbytes(numel: int, blocksize: int = 64) -> int:
    """Bytes one weight of ``numel`` values takes in a bnb-4bit file (double quantization, as we write it)."""
    blocks = -(-numel // blocksize)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + _FIXED_NF4_BYTES


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``weight`` quantized to NF4 (double quantization) and back, in its own dtype: what a 4-bit layer
    computes with. (out, in)

    Equal bit for bit to ``dequantize_nf4_state(*quantize_nf4(weight))`` (a test checks it), without packing
    the codes into bytes and unpacking them again: measuring a model runs this once per layer.
    """
    backend = _resolve_backend("auto", weight.device)
    idx, absmax = _nf4_codes(weight, blocksize, backend)  # (n,) uint8, (B,) fp32
    offset = absmax.mean()
    code8 = dynamic_map().to(weight.device)
    rounding = "cpu-lut" if backend == "cpu" else "nearest"
    q8, absmax2 = quantize_blockwise_8bit(absmax - offset, code8, NESTED_BLOCKSIZE, rounding)
    absmax = dequantize_blockwise_8bit(q8, absmax2, code8, NESTED_BLOCKSIZE) + offset  # (B,), as stored
    n = idx.numel()
    values = NF4_CODE.to(weight.device)[idx.long()]  # (n,) fp32
    values = torch.nn.functional.pad(values, (0, (-n) % blocksize)).view(-1, blocksize)  # (B, bs)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n].to(weight.dtype).reshape(weight.shape)


class OutputErrorMeter:
    """Forward hooks that add up, per linear layer, ||x D^T||^2 and ||y||^2 over every input x and output y
    (bias removed), with D = W - NF4(W) and W the weight rounded to ``dtype`` (what the folder stores).

    Use as a context manager around the calibration forwards; ``sums`` then holds (error, reference) per
    layer name. ``cache=True`` keeps each layer's NF4 weight (in ``dtype``) in ``roundtrips`` after its first
    batch: later batches and a perplexity check reuse it, for the memory of a second 16-bit copy of the
    measured layers. ``on_module(name)`` is called after each measurement (a progress bar).
    """

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype, cache: bool = False,
                 on_module: Callable[[str], None] | None = None):
        self.modules = modules
        self.dtype = dtype
        self.cache = cache
        self.on_module = on_module
        self.sums: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in modules}
        self.roundtrips: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def roundtrip(self, name: str) -> torch.Tensor:
        """The layer's weight as the folder's 4-bit layer computes with it: (out, in) in ``dtype``."""
        if name in self.roundtrips:
            return self.roundtrips[name]
        q = nf4_roundtrip(self.modules[name].weight.detach().to(self.dtype))
        if self.cache:
            self.roundtrips[name] = q
        return q

    def _hook(self, name: str):
        def measure(module: nn.Linear, args, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float()  # (N, in)
            y = output.detach().reshape(-1, module.out_features).float()  # (N, out)
            if module.bias is not None:
                y = y - module.bias.detach().float()
            weight = module.weight.detach().to(self.dtype).float()  # (out, in), as the folder stores it
            delta = weight - self.roundtrip(name).float()  # (out, in)
            e, r = self.sums[name]
            self.sums[name] = (e + (x @ delta.T).square().sum().item(), r + y.square().sum().item())
            if self.on_module is not None:
                self.on_module(name)

        return measure

    def __enter__(self) -> OutputErrorMeter:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class Candidate:
    """One checkpoint weight that could be 4-bit: its measured relative output error and its sizes."""

    name: str  # the module name as the checkpoint (and llm_int8_skip_modules) spells it
    numel: int
    bytes_16bit: int
    bytes_4bit: int
    error: float  # ||X (W - Q)^T||^2 per calibration token: what the choice ranks by
    rel_error: float  # ||X (W - Q)^T||^2 / ||X W^T||^2 on the same inputs (reported; W^T as the model computes)

    @property
    def extra_bytes(self) -> int:
        """What keeping it in 16-bit costs over 4-bit."""
        return self.bytes_16bit - self.bytes_4bit


def choose_16bit(candidates: list[Candidate], extra_budget: int) -> list[str]:
    """The layers to keep in 16-bit: largest output error first, each one that still fits ``extra_budget``
    bytes (a large layer that does not fit leaves room for smaller, less damaged ones after it)."""
    kept, left = [], extra_budget
    for c in sorted(candidates, key=lambda c: (-c.error, c.name)):
        if c.error > 0 and c.extra_bytes <= left:
            kept.append(c.name)
            left -= c.extra_bytes
    return kept
