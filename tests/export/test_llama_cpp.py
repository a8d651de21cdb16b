"""The real consumer: llama.cpp (llama-cpp-python) loads every file we write and computes what our
model computes. Tiny random models of every family, and every quantization method.

Tolerances. f16: llama.cpp rounds activations to fp16 for its fp16 matmuls and keeps an fp16 KV
cache, so its logits differ from fp32 by fp16 rounding (relative ~1e-3 per op): 2e-2 absolute
on logits of magnitude ~1-5. Quantized files: llama.cpp must compute what our own model computes
on the weights our `dequantize` reads from the file (same fp16 tolerance), which proves it reads
the blocks as we wrote them; the distance to the unquantized model may then be no larger than the
quantization error itself (that dequantized model's distance, plus the fp16 tolerance).
"""

from __future__ import annotations

import pytest
import torch

from velotune.export import save_pretrained_gguf
from velotune.export.gguf_reader import model_from_gguf
from velotune.export.verify import llama_cpp_logits

from . import tiny
from .conftest import IDS, lora

pytest.importorskip("llama_cpp")

F16_ATOL = 2e-2
PROMPTS = [row.tolist() for row in IDS]
METHODS = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
           "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
# top-1 agreement with the unquantized model that each bit width keeps on these flat tiny-model
# distributions (8 bits and up: nearly all; 2-3 bits: a majority)
MIN_TOP1 = {"f32": 0.95, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9, "q6_k": 0.8, "q2_k": 0.3, "q3_k_s": 0.4,
            "q3_k_m": 0.4, "q3_k_l": 0.4}


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
    dequantized = _ours(model_from_gguf(paths[method], model))
    for d, c in zip(dequantized, cpp):  # llama.cpp reads our blocks as our dequantize does
        assert (d - c).abs().max() < F16_ATOL, method
    original = _ours(model)
    quant_error = _rel(dequantized, original)
    scale = float(torch.cat([o.flatten() for o in original]).norm() / torch.cat([o.flatten() for o in original]).numel() ** 0.5)
    assert _rel(cpp, original) <= quant_error + F16_ATOL / scale, method
    top1 = float(torch.cat([(c.argmax(-1) == o.argmax(-1)).float() for c, o in zip(cpp, original)]).mean())
    assert top1 >= MIN_TOP1.get(method, 0.5), f"{method}: top-1 agreement {top1:.0%}"
