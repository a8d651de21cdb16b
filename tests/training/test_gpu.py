"""On a GPU: the seed's defaults (bf16, 8-bit AdamW) train, and the memory estimate bounds the measured peak."""

from __future__ import annotations

import pytest
import torch

from velotune import FastLanguageModel
from velotune.training import SFTTrainer, TrainingArguments

from .helpers import text_dataset, tiny_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_adamw_8bit_training_and_memory_estimate(tmp_path):
    folder = tiny_folder(tmp_path, seed=0)
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, device_map="cuda:0",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-3, logging_steps=1, report_to="none", max_length=64,
                             save_strategy="no")
    assert args.bf16 and args.optim == "adamw_8bit"
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(16), args=args)
    # cuBLAS takes its workspace (MiBs, more than this tiny model's activations) on the first matmul
    # with grad; take it before the baseline so the comparison is about the model's own memory.
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (x @ x).float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    trainer.train()
    peak = torch.cuda.max_memory_allocated()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert type(trainer.optimizer.optimizer).__module__.startswith("bitsandbytes")
    estimate = trainer.memory_estimate
    assert estimate.total >= 0.5 * (peak - baseline + estimate.weights)
