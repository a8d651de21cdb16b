"""save_pretrained_merged of a LoRA model over FP8-stored weights (quant/fp8.py): the merged folder
holds the dequantized e4m3 values (times their row scales) plus the LoRA delta, in 16/32-bit."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from tiny import export_shapes as tiny
from velotune.quant.fp8 import quantize_model_fp8_

from .conftest import logits, lora


def test_merging_an_fp8_model_dequantizes_the_values_and_scales(tok, tmp_path):
    base = tiny.model("llama")
    names = quantize_model_fp8_(base, skip_modules=("lm_head",))
    assert names and base.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    model = lora(base)
    expected = logits(model)  # FP8Linear's own forward: the dequantized values, fp32
    folder = model.save_pretrained_merged(tmp_path / "out", tok, save_method="merged_16bit")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)
