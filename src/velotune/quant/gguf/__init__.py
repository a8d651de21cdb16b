"""GGUF (llama.cpp) quantization in torch: every block type the export writes, and the per-tensor
type rules of each quantization method.

  quantize(weights, qtype) -> uint8 blocks   (for gguf.GGUFWriter.add_tensor(..., raw_dtype=qtype))
  dequantize(data, qtype, shape) -> float32 tensor
  ALLOWED_QUANTS / normalize_method(name) -> method names (the docs' table) and their canonical form
  tensor_qtype(method, gguf_name, n_layers, shape) -> the block type llama.cpp's mixture gives a tensor

The output is byte-identical to llama.cpp's own quantizers (``ggml_quantize_chunk`` without an
importance matrix, i.e. what ``llama-quantize`` writes): the searches follow ggml's float32
arithmetic step by step, in C's summation order, vectorised over blocks in torch so that they
run on the GPU when the weights are there. tests/quant checks the bytes against llama.cpp.
"""

from velotune.quant.gguf.codec import CODECS, dequantize, quantize
from velotune.quant.gguf.methods import (
    ALIASES,
    ALLOWED_QUANTS,
    DEFAULT_TYPE,
    FILE_TYPE,
    UNSUPPORTED_QUANTS,
    normalize_method,
    supported_methods_text,
)
from velotune.quant.gguf.mixture import tensor_qtype, use_more_bits

__all__ = [
    "ALIASES",
    "ALLOWED_QUANTS",
    "CODECS",
    "DEFAULT_TYPE",
    "FILE_TYPE",
    "UNSUPPORTED_QUANTS",
    "dequantize",
    "normalize_method",
    "quantize",
    "supported_methods_text",
    "tensor_qtype",
    "use_more_bits",
]
