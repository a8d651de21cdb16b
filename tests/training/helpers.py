"""Datasets and arguments for the training tests (their tiny models come from tests/tiny/)."""

from __future__ import annotations

import random

import torch
from datasets import Dataset


def text_rows(n: int, seed: int = 0, min_len: int = 4, max_len: int = 30) -> list[str]:
    """Strings of varied length over the tokenizer's characters, so batches need padding."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]


def text_dataset(n: int = 16, seed: int = 0, **kwargs) -> Dataset:
    return Dataset.from_dict({"text": text_rows(n, seed, **kwargs)})


def quiet_args(output_dir, **overrides) -> dict:
    """TrainingArguments keywords for small deterministic CPU runs."""
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    max_steps=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                    optim="adamw_torch", seed=0, bf16=False, fp16=False, disable_tqdm=True,
                    dataset_num_proc=None, use_cpu=True, max_length=64)
    settings.update(overrides)
    return settings


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
