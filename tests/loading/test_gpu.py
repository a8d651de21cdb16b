"""The same loading and LoRA paths on CUDA (skipped where there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from velotune import FastLanguageModel, is_bfloat16_supported
from velotune.quant import is_linear4bit

from tiny.folders import write_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IDS = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 5, 9, 33]])


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_load_train_generate_on_cuda(tmp_path, load_in_4bit):
    reference = write_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=load_in_4bit)
    assert model.device.type == "cuda"
    assert model.dtype == (torch.bfloat16 if is_bfloat16_supported() else torch.float16)
    if load_in_4bit:
        assert is_linear4bit(model.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        ours = model(IDS.cuda()).logits.float().cpu()
        theirs = reference(IDS).logits
    # bf16 weights (and NF4) against the fp32 reference: close, not equal.
    assert (ours - theirs).abs().max().item() < (0.25 if load_in_4bit else 0.05) * theirs.abs().max().item()

    peft_model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing="unsloth")
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 90, (4, 64), device="cuda")
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    FastLanguageModel.for_inference(peft_model)
    out = peft_model.generate(input_ids=IDS.cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 8)
