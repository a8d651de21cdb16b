"""Convergence parity: velotune's stack vs plain transformers + PEFT (+ bitsandbytes) on SmolLM2, CPU, fp32.

Same weights, same LoRA initialisation (the same random_state seeds PEFT's init of the same module
names in the same order), same data and order (same seed), same optimizer: the loss curves must
agree step for step. The reference side uses TRL's own SFTTrainer and transformers' own Llama.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModelForCausalLM
from transformers import BitsAndBytesConfig, LlamaForCausalLM
from trl import SFTConfig
from trl import SFTTrainer as TRLSFTTrainer

from velotune import FastLanguageModel
from velotune.data.bundled import bundled_rows
from velotune.training import SFTTrainer, TrainingArguments

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 3407
# 6 steps: the curve drops 2.94 -> 1.97 (LoRA), 3.11 -> 1.89 (QLoRA), well past the 0.3 checked, and a broken
# side shows from step 3 (measured 2026-11-30, our side given lora_alpha 17 instead of 16: gap 2.6e-2 LoRA,
# 2.9e-2 QLoRA; warmup 2 instead of 3 steps: 7.8e-2 LoRA; bounds 1e-3 and 1e-2). It was 15 steps, 30 before.
STEPS = 6


def _dataset(tokenizer, n=64) -> Dataset:
    rows = bundled_rows("instructions")[:n]
    return Dataset.from_dict({"text": [f"### Instruction:\n{r['instruction']}\n{r['input']}\n### Response:\n"
                                       f"{r['output']}" for r in rows]})


def _settings(output_dir, steps) -> dict:
    return dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=1e-3, warmup_steps=3, lr_scheduler_type="linear", weight_decay=0.01,
                logging_steps=1, save_strategy="no", report_to="none", optim="adamw_torch", seed=SEED, bf16=False,
                fp16=False, disable_tqdm=True, use_cpu=True, max_length=48, gradient_checkpointing=False,
                dataset_text_field="text")


def _curve(trainer) -> list[float]:
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _velotune_curve(folder, tmp_path, steps, load_in_4bit):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=load_in_4bit, device_map="cpu",
                                                         dtype=torch.float32, max_seq_length=48)
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing=False, random_state=SEED)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=_dataset(tokenizer),
                         args=TrainingArguments(**_settings(tmp_path / "velotune", steps)))
    return _curve(trainer), tokenizer


def _reference_curve(folder, tokenizer, tmp_path, steps, load_in_4bit):
    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                             quantization_config=quantization)
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        pytest.fail("the reference must see the same vocabulary as velotune's loader")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    random.seed(SEED)
    torch.manual_seed(SEED)
    model = PeftModelForCausalLM(model, config)
    trainer = TRLSFTTrainer(model=model, processing_class=tokenizer, train_dataset=_dataset(tokenizer),
                            args=SFTConfig(**_settings(tmp_path / "reference", steps)))
    return _curve(trainer)


def test_lora_loss_curve_equals_transformers_peft(smollm2_folder, tmp_path):
    folder = smollm2_folder
    ours, tokenizer = _velotune_curve(folder, tmp_path, STEPS, load_in_4bit=False)
    theirs = _reference_curve(folder, tokenizer, tmp_path, STEPS, load_in_4bit=False)
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0] - 0.3  # it really trains
    differences = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"LoRA fp32: max |loss difference| over {STEPS} steps {max(differences):.2e}; {ours[0]:.3f} -> {ours[-1]:.3f}")
    assert max(differences) < 1e-3, differences


def test_qlora_loss_curve_equals_transformers_peft_bitsandbytes(smollm2_folder, tmp_path):
    """NF4 is bit-exact with bitsandbytes, so the base weights are identical; the adapters are not computed alike.

    TRL casts QLoRA adapters to bf16 on both sides. PEFT's reference runs the LoRA branch in bf16 (input and
    product rounded to 8 mantissa bits, relative error 2^-8 = 3.9e-3), velotune's fused LoRA path may keep it in
    fp32, so the curves differ at the bf16 rounding level: measured max 4.2e-3 over 30 steps (2026-11-28,
    CPU), 6.0e-4 over 15 steps and 1.0e-3 over the 6 steps run now (2026-11-30); the bound 1e-2 is about 2.5x
    the largest gap, and a wrong LoRA scale (lora_alpha 17 on our side: gap 2.9e-2 within the 6 steps) exceeds it.
    """
    folder = smollm2_folder
    ours, tokenizer = _velotune_curve(folder, tmp_path, STEPS, load_in_4bit=True)
    theirs = _reference_curve(folder, tokenizer, tmp_path, STEPS, load_in_4bit=True)
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0] - 0.3
    differences = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"QLoRA: max |loss difference| over {STEPS} steps {max(differences):.2e}; {ours[0]:.3f} -> {ours[-1]:.3f}")
    assert max(differences) < 1e-2, differences
