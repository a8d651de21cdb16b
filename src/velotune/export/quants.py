"""The GGUF quantizer the exporter calls: velotune's own torch codecs and llama.cpp's mixture
rules (`velotune.quant.gguf`), plus the two small helpers the writer needs around them."""

from __future__ import annotations

import gguf
import numpy as np

from velotune.quant.gguf import ALLOWED_QUANTS, dequantize, normalize_method, quantize, tensor_qtype

Q = gguf.GGMLQuantizationType


def quantized_nbytes(shape: tuple[int, ...], qtype) -> int:
    """Bytes a tensor of logical `shape` takes in `qtype` (for the header, before any data exists)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def as_writable(array: np.ndarray) -> np.ndarray:
    """One flat uint8 array, the form `GGUFWriter.write_tensor_data` writes byte for byte."""
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


__all__ = ["ALLOWED_QUANTS", "as_writable", "dequantize", "normalize_method", "quantize", "quantized_nbytes",
           "tensor_qtype"]
