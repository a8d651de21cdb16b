"""Quantization method names and per-tensor type rules, checked against llama.cpp's own choice.

The oracle is ``llama_quant_compute_types`` (llama-ext.h), the function ``llama-quantize`` uses,
run on metadata-only tensors of mock models: a Llama-3-8B shape (32 layers, GQA 4), a SmolLM2-135M
shape (30 layers, rows of 576 that force the 256 -> 32 block fallbacks), a tied-embedding model,
a Phi-3-style fused attn_qkv, and an 80-layer GQA model (llama.cpp's 70B rule).
"""

from __future__ import annotations

import re

import gguf
import pytest
import torch

import ggml_ref
from velotune.quant import gguf as vg

Q = gguf.GGMLQuantizationType
RULES = ggml_ref.load_rules()
needs_llama = pytest.mark.skipif(RULES is None, reason="llama_cpp (llama-cpp-python) is not installed: no oracle")

SEED_TABLE = [  # the seed's ALLOWED_QUANTS keys, in its order
    "not_quantized", "fast_quantized", "quantized", "f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q2_k",
    "q3_k_l", "q3_k_m", "q3_k_s", "q4_0", "q4_1", "q4_k_s", "q4_k", "q5_k", "q5_0", "q5_1", "q5_k_s",
    "q6_k", "iq2_xxs", "iq2_xs", "iq3_xxs", "q3_k_xs",
]
CANONICAL = sorted(vg.FILE_TYPE)


def dense_model(n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, vocab: int,
                tied: bool = False, fused_qkv: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and torch shapes of a dense decoder, in convert_hf_to_gguf's order."""
    head = n_embd // n_head
    kv = n_head_kv * head
    names = [("token_embd.weight", (vocab, n_embd))]
    for i in range(n_layer):
        b = f"blk.{i}."
        names.append((b + "attn_norm.weight", (n_embd,)))
        if fused_qkv:
            names.append((b + "attn_qkv.weight", (n_embd + 2 * kv, n_embd)))
        else:
            names += [(b + "attn_q.weight", (n_embd, n_embd)), (b + "attn_k.weight", (kv, n_embd)),
                      (b + "attn_v.weight", (kv, n_embd))]
        names += [(b + "attn_output.weight", (n_embd, n_embd)), (b + "ffn_norm.weight", (n_embd,)),
                  (b + "ffn_gate.weight", (n_ff, n_embd)), (b + "ffn_up.weight", (n_ff, n_embd)),
                  (b + "ffn_down.weight", (n_embd, n_ff))]
    names.append(("output_norm.weight", (n_embd,)))
    if not tied:
        names.append(("output.weight", (vocab, n_embd)))
    return names


MODELS = {
    "llama3-8b": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, vocab=128256),
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, vocab=49152),
    "tied-30": dict(n_layer=30, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=16, vocab=32000, tied=True),
    "phi3-fused": dict(n_layer=32, n_embd=3072, n_ff=8192, n_head=32, n_head_kv=32, vocab=32064, fused_qkv=True),
    "llama-80-gqa": dict(n_layer=80, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=2, vocab=1024),
}


@needs_llama
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", CANONICAL)
def test_tensor_types_equal_llama_quantize(model, method):
    cfg = dict(MODELS[model])
    tied, fused = cfg.pop("tied", False), cfg.pop("fused_qkv", False)
    tensors = dense_model(**cfg, tied=tied, fused_qkv=fused)
    theirs = RULES.types(int(vg.FILE_TYPE[method]), tensors, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         n_head_kv=cfg["n_head_kv"], n_embd=cfg["n_embd"], n_ff=cfg["n_ff"])
    n_gqa = cfg["n_head"] // cfg["n_head_kv"]
    wrong = {}
    for name, shape in tensors:
        ours = vg.tensor_qtype(method, name, cfg["n_layer"], shape, n_gqa=n_gqa, tied_embeddings=tied)
        if theirs[name] is None:  # llama.cpp keeps these as the converter wrote them: F32 (1-D)
            expected = Q.F32
        else:
            expected = Q(theirs[name])
        if ours != expected:
            wrong[name] = (ours.name, expected.name)
    assert not wrong, f"{method} on {model}: (ours, llama.cpp) {dict(list(wrong.items())[:8])}"


def test_q4_k_m_layers_that_get_q6_k():
    """DESIGN.md §6: Q6_K for attn_v/ffn_down where i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2."""
    for n, expected in [(32, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]),
                        (30, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29])]:
        for kind, shape in [("attn_v", (1024, 4096)), ("ffn_down", (4096, 14336))]:
            got = [i for i in range(n) if vg.tensor_qtype("q4_k_m", f"blk.{i}.{kind}.weight", n, shape) == Q.Q6_K]
            assert got == expected, (n, kind)
            others = {vg.tensor_qtype("q4_k_m", f"blk.{i}.{kind}.weight", n, shape) for i in range(n)} - {Q.Q6_K}
            assert others == {Q.Q4_K}
    assert vg.tensor_qtype("quantized", "output.weight", 32, (128256, 4096)) == Q.Q6_K
    assert vg.tensor_qtype("q4_k_m", "blk.3.attn_norm.weight", 32, (4096,)) == Q.F32
    assert vg.tensor_qtype("q4_k_m", "blk.3.attn_q.weight", 32, (576, 576)) == Q.Q5_0  # 576 % 256 != 0
    assert vg.tensor_qtype("q6_k", "blk.3.attn_q.weight", 32, (576, 576)) == Q.Q8_0
    assert vg.tensor_qtype("q4_k_m", "blk.3.attn_q.weight", 32, (100, 100)) == Q.F16  # not even 32


def test_every_seed_method_is_accepted_or_refused_clearly():
    for name in SEED_TABLE:
        if name in vg.UNSUPPORTED_QUANTS:
            with pytest.raises(ValueError, match="not supported") as err:
                vg.normalize_method(name)
            assert "q4_k_m" in str(err.value) and "fast_quantized" in str(err.value)
        else:
            assert name in vg.ALLOWED_QUANTS and vg.ALLOWED_QUANTS[name].strip()
            assert vg.normalize_method(name) in vg.FILE_TYPE


def test_aliases_and_case():
    assert vg.normalize_method("quantized") == "q4_k_m"
    assert vg.normalize_method("fast_quantized") == "q8_0"
    assert vg.normalize_method("not_quantized") == "f16"
    assert vg.normalize_method("not_quantized", model_dtype=torch.bfloat16) == "bf16"
    assert vg.normalize_method("Q4_K") == "q4_k_m"
    assert vg.normalize_method(" q5_k ") == "q5_k_m"
    assert set(vg.DEFAULT_TYPE) == set(vg.FILE_TYPE) == {vg.normalize_method(m) for m in vg.ALLOWED_QUANTS}


def test_unknown_method_lists_every_method_with_description():
    with pytest.raises(ValueError, match="Unknown quantization_method 'q4_km'") as err:
        vg.normalize_method("q4_km")
    for name, text in vg.ALLOWED_QUANTS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(text)}$", str(err.value), re.M), name
    with pytest.raises(ValueError, match="iq4_nl"):
        vg.normalize_method("iq4_nl")
    with pytest.raises(ValueError, match="must be a string"):
        vg.normalize_method(None)
    with pytest.raises(ValueError, match="Unknown quantization_method"):
        vg.tensor_qtype("q9_k", "output.weight", 4, (32, 32))


def test_tensor_qtype_rejects_bad_layers_and_shapes():
    with pytest.raises(ValueError, match="layer 40, outside 0..31"):
        vg.tensor_qtype("q4_k_m", "blk.40.attn_v.weight", 32, (1024, 4096))
    with pytest.raises(ValueError, match="n_layers must be positive"):
        vg.tensor_qtype("q4_k_m", "blk.0.attn_v.weight", 0, (1024, 4096))
    with pytest.raises(ValueError, match="positive sizes"):
        vg.tensor_qtype("q4_k_m", "blk.0.attn_v.weight", 4, (0, 4096))
