"""Exports of a model that lives on the GPU (bf16): merging, dequantizing NF4 and quantizing all
run on the device; the files hold what the CPU path writes for the same model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from velotune.export import save_pretrained_gguf, save_pretrained_merged
from velotune.quant.gguf import dequantize

from tiny import export_shapes as tiny
from .conftest import IDS, logits, lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_lora_model_on_gpu_exports_merged_and_gguf(tok, tmp_path):
    model = lora(tiny.model("llama").to("cuda", torch.bfloat16))
    folder = save_pretrained_merged(model, tmp_path / "merged", tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    torch.testing.assert_close(logits(loaded, IDS.cuda()), logits(model, IDS.cuda()), atol=0.1, rtol=0.05)
    # same folder name on both sides: the file's general.name metadata comes from it
    paths = save_pretrained_gguf(model, tmp_path / "gpu" / "gguf", tok, quantization_method=["bf16", "q8_0", "q4_k_m"])
    cpu_paths = save_pretrained_gguf(model.cpu(), tmp_path / "cpu" / "gguf", tok,
                                     quantization_method=["bf16", "q8_0"], verify=False)
    # The LoRA merge (W + s * B @ A in bf16) rounds differently on the two devices, so the files hold
    # the same tensors up to bf16 rounding of the merge (and whatever quantization makes of that),
    # not the same bytes; the quantizers alone are byte-identical across devices (tests/quant).
    for gpu_file, cpu_file in zip(paths, cpu_paths):
        gpu, cpu = gguf.GGUFReader(gpu_file), gguf.GGUFReader(cpu_file)
        assert [t.name for t in gpu.tensors] == [t.name for t in cpu.tensors]
        for a, b in zip(gpu.tensors, cpu.tensors):
            assert a.tensor_type == b.tensor_type
            shape = tuple(int(d) for d in reversed(a.shape))
            wa, wb = (dequantize(np.ascontiguousarray(t.data).view(np.uint8), t.tensor_type, shape) for t in (a, b))
            assert (wa - wb).norm() <= 0.02 * wb.norm() + 1e-6, a.name
