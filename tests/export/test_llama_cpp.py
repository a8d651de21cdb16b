"""The real consumer: llama.cpp (llama-cpp-python) loads every file we write and computes what our
model computes. Tiny random models of every family, and every quantization method.

Tolerances, from how llama.cpp computes on the CPU:
  * float files: llama.cpp keeps an fp16 KV cache and rounds activations to the weights' type for
    its matmuls (fp16: 11-bit mantissa, bf16: 8-bit), so logits of magnitude ~1-5 move by ~1e-2
    (f32/f16) and ~5e-2 (bf16);
  * quantized files: llama.cpp also quantizes the activations to 8 bits (Q8_0/Q8_K blocks) for
    its quantized dot products. So against our own model running the weights our `dequantize`
    reads from the same file, it may differ only by that 8-bit activation rounding: about the
    relative logit error a q8_0 file itself causes on this model (~3%); 6% allows for it. A block
    llama.cpp read differently from how we wrote it would cost far more (each method's weight
    error here is 3-90%). Against the unquantized model, llama.cpp may then be off by at most the
    weight quantization error plus that activation rounding.
"""

from __future__ import annotations

import pytest
import torch

from velotune.export import save_pretrained_gguf
from velotune.export.gguf_reader import model_from_gguf
from velotune.export.verify import llama_cpp_logits

from tiny import export_shapes as tiny
from .conftest import IDS, lora

pytest.importorskip("llama_cpp")

FLOAT_ATOL = {"f32": 2e-2, "f16": 2e-2, "bf16": 1e-1}
F16_ATOL = FLOAT_ATOL["f16"]
ACTIVATION_ROUNDING = 0.06  # relative logit error of llama.cpp's 8-bit activations (see above)
PROMPTS = [row.tolist() for row in IDS]
METHODS = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
           "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]


@torch.no_grad()
def _ours(model) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0].float() for p in PROMPTS]


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_f16_logits_equal_llama_cpp(family, tok, tmp_path):
    model = lora(tiny.model(family), target_modules="all-linear")
    [path] = save_pretrained_gguf(model, tmp_path, tok, quantization_method="f16")
    for ours, cpp in zip(_ours(model), llama_cpp_logits(path, PROMPTS)):
        assert (ours - cpp).abs().max() < F16_ATOL, family
        assert torch.equal(ours.argmax(-1), cpp.argmax(-1))


@pytest.fixture(scope="module")
def every_method(tok, tmp_path_factory):
    """One export call, one pass over the weights, a file per method."""
    model = tiny.model("llama", std=0.08)
    folder = tmp_path_factory.mktemp("methods")
    paths = save_pretrained_gguf(model, folder, tok, quantization_method=METHODS, verify=False)
    return model, dict(zip(METHODS, paths))


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.cat([(x - y).flatten() for x, y in zip(a, b)])
    ref = torch.cat([y.flatten() for y in b])
    return float(diff.norm() / ref.norm())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_through_llama_cpp(method, every_method):
    model, paths = every_method
    cpp = llama_cpp_logits(paths[method], PROMPTS)
    original = _ours(model)
    if method in FLOAT_ATOL:
        for o, c in zip(original, cpp):
            assert (o - c).abs().max() < FLOAT_ATOL[method], method
        return
    dequantized = _ours(model_from_gguf(paths[method], model))
    assert _rel(cpp, dequantized) < ACTIVATION_ROUNDING, method  # llama.cpp reads our blocks as we wrote them
    top1 = float(torch.cat([(c.argmax(-1) == d.argmax(-1)).float() for c, d in zip(cpp, dequantized)]).mean())
    assert top1 >= 0.75, f"{method}: top-1 agreement with the file's own weights {top1:.0%}"
    assert _rel(cpp, original) <= _rel(dequantized, original) + ACTIVATION_ROUNDING, method
