"""``quantize``/``dequantize``: whole tensors <-> GGUF block bytes, chunked, on the tensor's device.

Each block codec maps (N, block_size) float32 -> (N, type_size) uint8 and back; this module
checks the input, converts it to float32 chunk by chunk (so an 8B model's largest tensor never
needs more than a bounded amount of scratch memory), and assembles the numpy array that
``gguf.GGUFWriter.add_tensor(name, array, raw_dtype=qtype)`` writes as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np
import torch

from velotune.quant.gguf import legacy
from velotune.quant.gguf import q2_k, q3_k, q4_k, q5_k, q6_k

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class BlockCodec:
    """How one GGML type turns blocks of floats into bytes and back."""

    quantize: Callable[[torch.Tensor], torch.Tensor]
    dequantize: Callable[[torch.Tensor], torch.Tensor]


def _float_codec(dtype: torch.dtype) -> BlockCodec:
    def enc(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).contiguous().view(torch.uint8)

    def dec(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(dtype).to(torch.float32)

    return BlockCodec(enc, dec)


CODECS: dict[gguf.GGMLQuantizationType, BlockCodec] = {
    Q.F32: _float_codec(torch.float32),
    Q.F16: _float_codec(torch.float16),
    Q.BF16: _float_codec(torch.bfloat16),
    Q.Q8_0: BlockCodec(legacy.quantize_q8_0, legacy.dequantize_q8_0),
    Q.Q4_0: BlockCodec(legacy.quantize_q4_0, legacy.dequantize_q4_0),
    Q.Q4_1: BlockCodec(legacy.quantize_q4_1, legacy.dequantize_q4_1),
    Q.Q5_0: BlockCodec(legacy.quantize_q5_0, legacy.dequantize_q5_0),
    Q.Q5_1: BlockCodec(legacy.quantize_q5_1, legacy.dequantize_q5_1),
    Q.Q2_K: BlockCodec(q2_k.quantize_blocks, q2_k.dequantize_blocks),
    Q.Q3_K: BlockCodec(q3_k.quantize_blocks, q3_k.dequantize_blocks),
    Q.Q4_K: BlockCodec(q4_k.quantize_blocks, q4_k.dequantize_blocks),
    Q.Q5_K: BlockCodec(q5_k.quantize_blocks, q5_k.dequantize_blocks),
    Q.Q6_K: BlockCodec(q6_k.quantize_blocks, q6_k.dequantize_blocks),
}

# float32 values per chunk: bounds the k-quant searches' scratch memory (CPU: small enough to stay in cache)
_CHUNK_VALUES = {"cpu": 1 << 18, "cuda": 1 << 26}


def _check_qtype(qtype) -> gguf.GGMLQuantizationType:
    try:
        checked = Q(qtype)
    except ValueError:
        checked = None
    if checked not in CODECS:
        names = ", ".join(t.name for t in CODECS)
        shown = checked.name if checked is not None else repr(qtype)
        raise ValueError(f"GGML type {shown} is not supported; supported types: {names}")
    return checked


def _rows_per_chunk(cols: int, device: torch.device) -> int:
    budget = _CHUNK_VALUES.get(device.type, _CHUNK_VALUES["cuda"])
    return max(1, budget // cols)


def quantize(weights: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D weight (rows, cols) to GGML type ``qtype``, computing on its own device.

    Returns uint8 (rows, cols // block_size * type_size), byte-identical in layout to ggml's
    blocks (and in value to llama.cpp's reference quantizer for the legacy types).
    """
    qtype = _check_qtype(qtype)
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be 2-D (rows, cols), got shape {tuple(weights.shape)}; "
                         f"reshape 1-D tensors to (1, n) or keep them F32")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor, got dtype {weights.dtype}")
    rows, cols = weights.shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block != 0 or cols == 0:
        raise ValueError(f"{qtype.name} needs a row length that is a positive multiple of {block}, "
                         f"got shape {tuple(weights.shape)}; pick the type with "
                         f"velotune.quant.gguf.tensor_qtype, which falls back as llama.cpp does")
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    codec = CODECS[qtype]
    step = _rows_per_chunk(cols, weights.device)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            chunk = weights[r0:r0 + step].to(torch.float32)  # (r, cols)
            finite = torch.isfinite(chunk).all(dim=1)
            if not bool(finite.all()):
                bad = r0 + int((~finite).nonzero()[0, 0])
                raise ValueError(f"weights row {bad} contains NaN or inf; GGUF cannot quantize it "
                                 f"(check the model for diverged training)")
            blocks = chunk.reshape(-1, block)  # (r * cols / block, block)
            packed = codec.quantize(blocks)  # (r * cols / block, type_size)
            out[r0:r0 + chunk.shape[0]] = packed.reshape(chunk.shape[0], -1).cpu().numpy()
    return out


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               device: torch.device | str | None = None) -> torch.Tensor:
    """Decode GGML blocks (any uint8 array holding ``shape``'s values) to float32 of ``shape``."""
    qtype = _check_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 0
    if not shape or shape[-1] % block != 0:
        raise ValueError(f"{qtype.name}: shape {shape} needs a last dimension that is a multiple of {block}")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != n // block * type_size:
        raise ValueError(f"{qtype.name} data of shape {shape} must have {n // block * type_size} bytes, "
                         f"got {raw.size}")
    blocks = torch.from_numpy(raw.copy()).to(device or "cpu").reshape(-1, type_size)  # (N, type_size)
    with torch.no_grad():
        return CODECS[qtype].dequantize(blocks).reshape(shape)
