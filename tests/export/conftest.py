"""Shared pieces of the export tests: the tiny tokenizer (built once) and LoRA models."""

from __future__ import annotations

import pytest
import torch

from velotune import FastLanguageModel

from tiny import export_shapes as tiny


@pytest.fixture(scope="session")
def tok():
    return tiny.tokenizer()


def lora(model, r: int = 8, seed: int = 1, **kwargs):
    """Our get_peft_model, with LoRA B made non-zero so the adapter changes the outputs."""
    peft_model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=16, use_gradient_checkpointing=False,
                                                  **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


IDS = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 5, 9, 33, 300, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 400, 2]])


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()
