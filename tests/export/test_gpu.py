"""Exports of a model that lives on the GPU (bf16): merging, dequantizing NF4 and quantizing all
run on the device; the files equal what the CPU path writes for the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from velotune.export import save_pretrained_gguf, save_pretrained_merged

from . import tiny
from .conftest import IDS, logits, lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_lora_model_on_gpu_exports_merged_and_gguf(tok, tmp_path):
    model = lora(tiny.model("llama").to("cuda", torch.bfloat16))
    folder = save_pretrained_merged(model, tmp_path / "merged", tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    torch.testing.assert_close(logits(loaded, IDS.cuda()), logits(model, IDS.cuda()), atol=0.1, rtol=0.05)
    paths = save_pretrained_gguf(model, tmp_path / "gguf", tok, quantization_method=["bf16", "q8_0", "q4_k_m"])
    cpu_paths = save_pretrained_gguf(model.cpu(), tmp_path / "gguf_cpu", tok,
                                     quantization_method=["bf16", "q8_0"], verify=False)
    for gpu_file, cpu_file in zip(paths, cpu_paths):  # same bytes whichever device quantized them
        assert gpu_file.read_bytes() == cpu_file.read_bytes()
