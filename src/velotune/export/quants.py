"""The GGUF quantizer the exporter calls: velotune's own torch codecs and llama.cpp's mixture
rules (`velotune.quant.gguf`), plus the two small helpers the writer needs around them."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from velotune.quant.gguf import ALLOWED_QUANTS, dequantize, normalize_method, quantize, tensor_qtype

Q = gguf.GGMLQuantizationType


def quantized_nbytes(shape: tuple[int, ...], qtype) -> int:
    """Bytes a tensor of logical `shape` takes in `qtype` (for the header, before any data exists)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def encode(value: torch.Tensor, qtype) -> np.ndarray:
    """`value` (rows, cols) in `qtype`'s bytes. Float types are a plain cast (round to nearest even,
    as llama.cpp's converter does), checked for NaN/inf with one reduction instead of per row: on
    the CPU that is most of an f16 export's time otherwise."""
    if qtype not in _FLOATS:
        return quantize(value, qtype)
    if not bool(torch.isfinite(value.sum(dtype=torch.float64))):
        raise ValueError("the weights contain NaN or inf; GGUF cannot store a usable model (check the model for "
                         "diverged training)")
    return value.to(_FLOATS[qtype]).contiguous().view(torch.uint8).cpu().numpy()


def as_writable(array: np.ndarray) -> np.ndarray:
    """One flat uint8 array, the form `GGUFWriter.write_tensor_data` writes byte for byte."""
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


__all__ = ["ALLOWED_QUANTS", "as_writable", "dequantize", "encode", "normalize_method", "quantize", "quantized_nbytes",
           "tensor_qtype"]
