"""Per-tensor block types of each GGUF method: llama.cpp's mixture rules, for dense decoders.

This restates ``llama_tensor_get_type`` (src/llama-quant.cpp, llama.cpp as vendored by
llama-cpp-python 0.3.36) for the methods velotune writes, so that our ``q4_k_m`` file holds the
same types as ``llama-quantize model-f16.gguf q4_k_m`` would:
  * 1-D tensors and ``*_norm.weight`` stay F32 (as convert_hf_to_gguf writes them);
  * ``output.weight`` (and ``token_embd.weight`` when the embeddings are tied, i.e. the file has
    no ``output.weight``): Q8_0 if its row length is not a multiple of the method's block size,
    else Q6_K unless the method is q8_0;
  * ``attn_v``/``attn_qkv`` and ``ffn_down`` get more bits in the layers picked by
    ``use_more_bits`` (the first and last eighth, and every third layer between);
  * a row length that is not a multiple of the chosen type's block falls back to a 32-block type
    (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 if even 32 does
    not divide it.
Mixture-of-experts (``n_expert == 8``) and Falcon special cases are not covered: velotune's model
families are dense.
"""

from __future__ import annotations

import re

import gguf

from velotune.quant.gguf.methods import DEFAULT_TYPE, normalize_method

Q = gguf.GGMLQuantizationType
_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    """Values per block of ``qtype`` (1 for float types)."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get a bigger type in the *_m mixtures."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the tensors of dense decoders."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(s in name for s in ("ffn_gate_inp.weight", "position_embd", "token_types"))


def _layer_of(name: str, n_layers: int) -> int:
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"tensor {name!r} has no 'blk.<i>.' prefix, so its layer is unknown")
    i = int(match.group(1))
    if not 0 <= i < n_layers:
        raise ValueError(f"tensor {name!r} is in layer {i}, outside 0..{n_layers - 1} (n_layers={n_layers})")
    return i


def _mixture(method: str, new: gguf.GGMLQuantizationType, name: str, n_layers: int, ncols: int,
             n_gqa: int, tied_embeddings: bool, is_70b: bool) -> gguf.GGMLQuantizationType:
    """``llama_tensor_get_type_impl`` restricted to velotune's methods and dense models."""
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        if ncols % block_size(new) != 0:
            return Q.Q8_0
        return new if new == Q.Q8_0 else Q.Q6_K
    if name == "token_embd.weight":
        return new
    if "attn_v.weight" in name or "attn_qkv.weight" in name or "attn_kv_b.weight" in name:
        i = _layer_of(name, n_layers)
        if method == "q2_k":
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif method == "q3_k_m":
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif method == "q3_k_l":
            new = Q.Q5_K
        elif method in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            new = Q.Q6_K
        elif method == "q4_k_s" and i < 4:
            new = Q.Q5_K
        if is_70b and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K
        return new
    if "ffn_down" in name:
        i = _layer_of(name, n_layers)
        if method == "q2_k":
            new = Q.Q3_K
        elif method == "q3_k_m":
            new = Q.Q5_K if i < n_layers // 16 else Q.Q4_K
        elif method == "q3_k_l":
            new = Q.Q5_K
        elif method in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            new = Q.Q6_K
        elif method == "q4_k_s" and i < n_layers // 8:
            new = Q.Q5_K
        return new
    if "attn_output.weight" in name:
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(method, new)
    return new


def _fallback(qtype: gguf.GGMLQuantizationType, ncols: int) -> gguf.GGMLQuantizationType:
    """llama.cpp's ``tensor_type_fallback``: a type whose block divides the row length."""
    if ncols % block_size(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ncols % block_size(qtype) == 0 else Q.F16


def tensor_qtype(method: str, gguf_tensor_name: str, n_layers: int, shape: tuple[int, ...], *, n_gqa: int = 1,
                 tied_embeddings: bool = False, is_70b: bool | None = None) -> gguf.GGMLQuantizationType:
    """The block type llama.cpp would give tensor ``gguf_tensor_name`` under ``method``.

    ``shape`` is the torch shape (rows, cols); the row length is ``shape[-1]`` (ggml's ne[0]).
    ``n_gqa`` = n_heads / n_kv_heads (q2_k gives attn_v Q4_K when >= 4); ``tied_embeddings``:
    the file has no ``output.weight`` (token_embd then follows the output rule); ``is_70b``:
    llama.cpp's LLM_TYPE_70B, which bumps Q3_K/Q4_K attn_v to Q5_K; by default inferred as
    llama.cpp's loaders do for Llama/Qwen2: 80 layers with grouped-query attention.
    """
    if is_70b is None:
        is_70b = n_layers == 80 and n_gqa > 1
    canonical = normalize_method(method)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"tensor {gguf_tensor_name!r}: shape {shape} must be non-empty with positive sizes")
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    default = DEFAULT_TYPE[canonical]
    if len(shape) < 2 or gguf_tensor_name.endswith("_norm.weight") or default == Q.F32:
        return Q.F32
    if default in _FLOAT_TYPES:
        return default
    if not _allows_quantization(gguf_tensor_name, shape):
        return Q.F32 if "ffn_gate_inp" in gguf_tensor_name else Q.F16
    ncols = shape[-1]
    new = _mixture(canonical, default, gguf_tensor_name, n_layers, ncols, n_gqa, tied_embeddings, is_70b)
    return _fallback(new, ncols)
