"""Quantized weights: NF4 in bitsandbytes' layout (QLoRA), computed by our own torch code."""

from velotune.quant.availability import nf4_available
from velotune.quant.linear import is_linear4bit, quantize_model_, to_linear4bit
from velotune.quant.nf4 import NF4_CODE, block_absmax, dequantize_nf4_state, quantize_nf4
from velotune.quant.serialization import linear4bit_state_dict, load_prequantized

__all__ = [
    "NF4_CODE",
    "block_absmax",
    "dequantize_nf4_state",
    "is_linear4bit",
    "linear4bit_state_dict",
    "load_prequantized",
    "nf4_available",
    "quantize_model_",
    "quantize_nf4",
    "to_linear4bit",
]
