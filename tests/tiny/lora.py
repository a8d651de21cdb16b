"""Tiny velotune models with LoRA on every projection, for fast-vs-plain comparisons."""

from __future__ import annotations

import torch

from tiny.families import VOCAB, make_config, randomize_
from velotune.lora import get_peft_model
from velotune.models import model_class_for


def lora_model(family: str, dtype=torch.float32, device="cpu", checkpointing=False, nf4=False, config=None,
               realistic=False, **lora):
    """Our model of `family` (random weights), LoRA r=4 on q/k/v/o/gate/up/down with non-zero B;
    `nf4`: every projection quantized to bitsandbytes NF4 first (QLoRA); `realistic`: the
    models' own init (std 0.02) and PEFT's (B = 0) instead of the parity suite's large weights."""
    config = config or make_config(family)
    torch.manual_seed(0)
    model = model_class_for(config)(config)
    if not realistic:
        randomize_(model)
    model = model.to(device=device, dtype=dtype)
    if nf4:
        from velotune.quant import quantize_model_

        quantize_model_(model, compute_dtype=dtype)
    lora = {"r": 4, "lora_alpha": 8, **lora}
    peft = get_peft_model(model, use_gradient_checkpointing=checkpointing, **lora)
    if realistic:
        return peft.train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft.train()


def batch(device="cpu", B=2, T=9, seed=0):
    """input_ids / labels / a left-padded attention mask; labels ignore the padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads
