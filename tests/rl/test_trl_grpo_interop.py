"""TRL's own GRPOTrainer, given a velotune model, trains it (issue 17 item 1: its loop may be slower)."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer

from velotune import FastLanguageModel


def test_trl_grpo_trainer_trains_a_velotune_lora_model(tiny_llama_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                             use_gradient_checkpointing=False)
    data = Dataset.from_dict({"prompt": ["hello", "abc", "xyz", "qq"]})

    def shorter_is_better(prompts, completions, **kwargs):
        return [-len(c) / 10 for c in completions]

    args = TRLGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                         save_strategy="no", bf16=False, use_cpu=True, gradient_checkpointing=False, beta=0.1,
                         disable_tqdm=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = TRLGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[shorter_is_better], args=args,
                             train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["kl"]) for e in logs)
