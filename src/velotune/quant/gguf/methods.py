"""GGUF quantization method names (the docs' ``ALLOWED_QUANTS`` table) and what each one means.

A *method* names a whole-file recipe (llama.cpp's "ftype", e.g. ``q4_k_m``); the per-tensor block
type it implies is decided by ``velotune.quant.gguf.mixture.tensor_qtype``. Aliases follow the
seed: ``not_quantized`` = the model's 16-bit dtype, ``fast_quantized`` = ``q8_0``, ``quantized`` =
``q4_k_m``, ``q4_k``/``q5_k``/``q3_k`` = the ``_m`` mixture (as llama.cpp's quantize tool).
"""

from __future__ import annotations

import gguf
import torch

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# canonical method -> one-line description (our words; sizes are bits per weight of the main type)
_CANONICAL: dict[str, str] = {
    "f32": "No quantization, 32-bit floats: exact, but twice the size of f16 and slow.",
    "f16": "No quantization, 16-bit floats: exact up to fp16 rounding; big files, fast to write.",
    "bf16": "No quantization, bfloat16: exact for bf16-trained models; big files, fast to write.",
    "q8_0": "8-bit blocks of 32 (8.5 bpw): near-lossless, half of f16's size; fast to write.",
    "q6_k": "Q6_K everywhere (6.56 bpw): very close to f16.",
    "q5_k_m": "Q5_K, with Q6_K for output, half of attn_v and ffn_down (~5.7 bpw): recommended.",
    "q5_k_s": "Q5_K for all weights, Q6_K for output (~5.5 bpw).",
    "q5_1": "Legacy 5-bit blocks of 32 with scale and offset (6 bpw).",
    "q5_0": "Legacy 5-bit blocks of 32 with a scale (5.5 bpw).",
    "q4_k_m": "Q4_K, with Q6_K for output, half of attn_v and ffn_down (~4.9 bpw): recommended.",
    "q4_k_s": "Q4_K for most weights, Q5_K for the first attn_v/ffn_down layers, Q6_K output (~4.6 bpw).",
    "q4_1": "Legacy 4-bit blocks of 32 with scale and offset (5 bpw).",
    "q4_0": "Legacy 4-bit blocks of 32 with a scale (4.5 bpw).",
    "q3_k_l": "Q3_K, with Q5_K for attn_v, attn_output and ffn_down (~4.3 bpw).",
    "q3_k_m": "Q3_K, with Q4_K/Q5_K for attn_v, attn_output and ffn_down (~3.9 bpw).",
    "q3_k_s": "Q3_K for all weights, Q6_K for output (~3.5 bpw).",
    "q2_k": "Q2_K, with Q3_K/Q4_K for attn_v, attn_output and ffn_down (~3.0 bpw): large quality loss.",
}

# alias -> canonical method; "not_quantized" resolves to f16 or bf16 (see normalize_method)
ALIASES: dict[str, str] = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "q3_k": "q3_k_m",
}

_ALIAS_TEXT: dict[str, str] = {
    "not_quantized": "Alias for the model's 16-bit dtype (f16, or bf16 for bf16 models): fast, exact, big.",
    "fast_quantized": "Alias for q8_0: fast to write, near-lossless, half of f16's size.",
    "quantized": "Alias for q4_k_m: small files, fast inference, small quality loss.",
    "q4_k": "Alias for q4_k_m.",
    "q5_k": "Alias for q5_k_m.",
    "q3_k": "Alias for q3_k_m.",
}

ALLOWED_QUANTS: dict[str, str] = {**_ALIAS_TEXT, **_CANONICAL}

# methods of the docs' table that need llama.cpp's i-quant grids and an importance matrix
UNSUPPORTED_QUANTS: dict[str, str] = {
    "iq2_xxs": "i-quant, 2.06 bpw",
    "iq2_xs": "i-quant, 2.31 bpw",
    "iq3_xxs": "i-quant, 3.06 bpw",
    "q3_k_xs": "llama.cpp's IQ3_XS mixture (i-quants)",
}

# canonical method -> the block type most tensors get (llama_ftype_get_default_type)
DEFAULT_TYPE: dict[str, gguf.GGMLQuantizationType] = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
    "q2_k": Q.Q2_K, "q3_k_s": Q.Q3_K, "q3_k_m": Q.Q3_K, "q3_k_l": Q.Q3_K,
    "q4_k_s": Q.Q4_K, "q4_k_m": Q.Q4_K, "q5_k_s": Q.Q5_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K,
}

# canonical method -> the value of the GGUF key general.file_type
FILE_TYPE: dict[str, gguf.LlamaFileType] = {
    "f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0,
    "q4_0": FT.MOSTLY_Q4_0, "q4_1": FT.MOSTLY_Q4_1, "q5_0": FT.MOSTLY_Q5_0, "q5_1": FT.MOSTLY_Q5_1,
    "q2_k": FT.MOSTLY_Q2_K, "q3_k_s": FT.MOSTLY_Q3_K_S, "q3_k_m": FT.MOSTLY_Q3_K_M,
    "q3_k_l": FT.MOSTLY_Q3_K_L, "q4_k_s": FT.MOSTLY_Q4_K_S, "q4_k_m": FT.MOSTLY_Q4_K_M,
    "q5_k_s": FT.MOSTLY_Q5_K_S, "q5_k_m": FT.MOSTLY_Q5_K_M, "q6_k": FT.MOSTLY_Q6_K,
}


def supported_methods_text() -> str:
    """Every accepted method with its description, one per line (for error messages)."""
    width = max(len(k) for k in ALLOWED_QUANTS)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in ALLOWED_QUANTS.items())


def normalize_method(name: str, model_dtype: torch.dtype | None = None) -> str:
    """Map a method name or alias (any case) to its canonical name, e.g. ``"quantized"`` -> ``"q4_k_m"``.

    ``not_quantized`` becomes ``"bf16"`` when ``model_dtype`` is ``torch.bfloat16``, else ``"f16"``.
    Raises ValueError naming every supported method for unknown or unsupported names.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"quantization_method must be a string, got {type(name).__name__}. "
            f"Supported methods:\n{supported_methods_text()}"
        )
    key = name.strip().lower()
    if key == "not_quantized":
        return "bf16" if model_dtype == torch.bfloat16 else "f16"
    key = ALIASES.get(key, key)
    if key in _CANONICAL:
        return key
    if key in UNSUPPORTED_QUANTS or key.startswith("iq"):
        raise ValueError(
            f"quantization_method {name!r} is not supported by velotune: i-quants "
            f"({', '.join(UNSUPPORTED_QUANTS)}) need llama.cpp's lattice codebooks and an importance "
            f"matrix, which velotune does not compute. Use one of:\n{supported_methods_text()}"
        )
    raise ValueError(f"Unknown quantization_method {name!r}. Supported methods:\n{supported_methods_text()}")
