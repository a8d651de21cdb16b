"""bench/bench_train.py's NF4 builder (how the 70B QLoRA row runs on one GPU): random weights made one
decoder layer at a time and quantized as they are made, never a whole 16-bit model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_every_decoder_projection_is_nf4_and_nothing_is_left_on_meta():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from transformers import LlamaConfig

    from velotune.models.families import LlamaForCausalLM
    from velotune.quant.linear import is_linear4bit

    assert bench.SHAPES["llama70b"]["num_hidden_layers"] == 80  # the Llama-3.1-70B shape the 70B rows use
    config = LlamaConfig(**bench.SHAPES["tiny"])
    model = bench.build_nf4_per_layer(LlamaForCausalLM, config, "cpu", torch.float32)
    four_bit = {name for name, module in model.named_modules() if is_linear4bit(module)}
    assert len(four_bit) == 7 * config.num_hidden_layers and all(".layers." in name for name in four_bit)
    assert not is_linear4bit(model.lm_head) and model.lm_head.weight.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.model.norm.weight.eq(1).all()  # drawn by the model's own _init_weights
    std = model.model.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025
    ids = torch.randint(4, 500, (1, 16))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5
