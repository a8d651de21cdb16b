"""Triton kernels of the GPU fast path, each with a plain PyTorch reference.

Every public op dispatches to Triton for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``) and to its ``*_reference`` otherwise; ``use_triton=True/False`` forces a
path. One op per file: private ``@triton.jit`` kernels -> launcher -> ``torch.autograd.Function``
-> reference.
"""

from ._triton import set_fast_launch
from .fp8 import dequantize_fp8_rows, quantize_fp8_rows, quantize_fp8_rows_reference
from .fp8_transpose import transpose_bytes, transpose_bytes_reference
from .cross_entropy import (
    FusedLinearCrossEntropyFunction,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .glu import GatedActivationFunction, geglu, geglu_reference, swiglu, swiglu_reference
from .logprobs import ChunkedLogprobsFunction, chunked_logprobs, chunked_logprobs_reference
from .nf4 import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_weight
from .nf4_fp8 import dequantize_nf4_to_fp8, nf4_to_fp8_reference
from .nf4_fp8_transposed import nf4_to_fp8_transposed_reference
from .rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from .rope import RoPEFunction, apply_rope, apply_rope_reference

__all__ = [
    "ChunkedLogprobsFunction",
    "chunked_logprobs",
    "chunked_logprobs_reference",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dequantize_nf4_weight",
    "dequantize_nf4_to_fp8",
    "nf4_to_fp8_reference",
    "nf4_to_fp8_transposed_reference",
    "transpose_bytes",
    "transpose_bytes_reference",
    "quantize_fp8_rows",
    "quantize_fp8_rows_reference",
    "dequantize_fp8_rows",
    "FusedLinearCrossEntropyFunction",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "GatedActivationFunction",
    "geglu",
    "geglu_reference",
    "swiglu",
    "swiglu_reference",
    "RoPEFunction",
    "apply_rope",
    "apply_rope_reference",
    "RMSNormFunction",
    "rms_norm",
    "rms_norm_reference",
    "set_fast_launch",
]
