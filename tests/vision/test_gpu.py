"""FastVisionModel on CUDA (skipped where there is no GPU): NF4 loading quantizes the text decoder layer by
layer onto the GPU, nothing is left on the CPU, and a LoRA step runs in the GPU's 16-bit dtype."""

from __future__ import annotations

import pytest
import torch

from velotune import FastVisionModel, UnslothVisionDataCollator, is_bfloat16_supported
from velotune.quant import is_linear4bit

from .test_collator import _rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mllama"])
def test_nf4_load_and_a_lora_step_on_cuda(family, vision_folder):
    model, processor = FastVisionModel.from_pretrained(str(vision_folder(family)), load_in_4bit=True)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert is_linear4bit(model.model.language_model.layers[0].mlp.up_proj)
    assert model.dtype == (torch.bfloat16 if is_bfloat16_supported() else torch.float16)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    FastVisionModel.for_training(model)
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
