"""The seed's snippets with velotune's trainer, and velotune models in TRL's and transformers' own trainers."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from velotune import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, is_bfloat16_supported
from velotune.training import SFTTrainer, Trainer, TrainingArguments

from .helpers import quiet_args, text_dataset
from tiny.folders import tiny_lora


def _changed(model, before) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_aliases_are_the_same_classes():
    assert UnslothTrainer is Trainer is SFTTrainer and UnslothTrainingArguments is TrainingArguments


def test_fp16_on_a_cpu_only_machine_trains_in_fp32():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only rule")
    args = TrainingArguments(output_dir="unused", report_to="none", fp16=True)
    assert args.fp16 is False and args.bf16 is False
    assert TrainingArguments(output_dir="unused", report_to="none", bf16=True).bf16 is True


def test_seed_defaults():
    args = TrainingArguments(output_dir="unused", report_to="none")
    assert args.bf16 is is_bfloat16_supported()
    # fp16 where the GPU lacks bf16; never on a CPU-only machine, where fp16 is emulated and ~18x slower
    assert args.fp16 is (not is_bfloat16_supported() and torch.cuda.is_available())
    assert args.optim in ("adamw_8bit", "adamw_torch")  # adamw_8bit wherever bitsandbytes can step it
    assert args.embedding_learning_rate is None


@pytest.mark.slow
def test_seed_alpaca_snippet_runs_as_written_on_smollm2(smollm2, tmp_path):
    """The notebook's SFTTrainer call: tokenizer=, dataset_text_field=, max_seq_length=, dataset_num_proc=,
    packing= on the trainer, transformers' TrainingArguments with adamw_8bit and the fp16/bf16 switch
    (is_bfloat16_supported() is False on a CPU, so the switch asks for fp16, which transformers accepts
    there). SFTTrainer is velotune's: TRL 1.x's no longer takes those keywords."""
    from transformers import TrainingArguments as HFTrainingArguments  # as the seed imports them

    from velotune import SFTTrainer as SeedSFTTrainer
    from velotune.data.bundled import bundled_rows

    max_seq_length = 32
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2[0].name_or_path, max_seq_length=max_seq_length,
                                                         dtype=None, load_in_4bit=False, device_map="cpu")
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None)
    prompt = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
    rows = bundled_rows("instructions")[:16]
    dataset = Dataset.from_dict({"text": [prompt.format(r["instruction"], r["input"], r["output"])
                                          + tokenizer.eos_token for r in rows]})
    trainer = SeedSFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=max_seq_length, dataset_num_proc=2, packing=False,
        args=HFTrainingArguments(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0, max_steps=1,
            learning_rate=2e-4, fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(), logging_steps=1,
            optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
            output_dir=str(tmp_path), report_to="none"),
    )
    before = _snapshot(model)
    stats = trainer.train()
    assert trainer.args.max_length == max_seq_length and trainer.args.dataset_num_proc == 2
    assert type(trainer.optimizer.optimizer).__name__ in ("AdamW8bit", "AdamW")
    assert torch.isfinite(torch.tensor(stats.training_loss)) and _changed(model, before)


def test_transformers_arguments_with_8bit_adamw_convert(tiny_llama_dir, tmp_path):
    """transformers' TrainingArguments (as the DPO/SFT pages import them) become velotune's, keeping every
    setting; adamw_8bit takes real bitsandbytes steps on this device (or falls back with a notice)."""
    from transformers import TrainingArguments as HFTrainingArguments

    from velotune.training.arguments import eight_bit_adamw_works

    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = HFTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                               learning_rate=2e-4, optim="adamw_8bit", weight_decay=0.01, seed=3407,
                               report_to="none", logging_steps=1, warmup_steps=1)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=text_dataset(8),
                         dataset_text_field="text", max_seq_length=32, args=args)
    assert isinstance(trainer.args, TrainingArguments)
    assert (trainer.args.learning_rate, trainer.args.weight_decay, trainer.args.seed) == (2e-4, 0.01, 3407)
    before = _snapshot(model)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    if eight_bit_adamw_works("cpu"):
        assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.args.optim_bits == 8
    else:
        assert trainer.args.optim == "adamw_torch"
    assert _changed(model, before)


def test_plain_trl_sft_trainer_trains_velotune_models(tiny_llama_dir, tmp_path):
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    model, tokenizer = tiny_lora(tiny_llama_dir)
    before = _snapshot(model)
    trainer = TRLSFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(8),
                            args=SFTConfig(**quiet_args(tmp_path, max_steps=2)))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert _changed(model, before)


def test_transformers_trainer_trains_velotune_models(tiny_llama_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFTrainingArguments

    model, tokenizer = tiny_lora(tiny_llama_dir)
    texts = text_dataset(8)["text"]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    settings = {k: v for k, v in quiet_args(tmp_path, max_steps=2).items()
                if k not in ("dataset_num_proc", "max_length")}
    trainer = HFTrainer(model=model, args=HFTrainingArguments(**settings), train_dataset=dataset,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    before = _snapshot(model)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert _changed(model, before)


def test_new_style_sft_config_and_trainer_level_packing(tiny_llama_dir, tmp_path):
    from trl import SFTConfig

    model, tokenizer = tiny_lora(tiny_llama_dir)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(16),
                         args=SFTConfig(**quiet_args(tmp_path, max_steps=1)), packing=True, max_seq_length=32)
    assert isinstance(trainer.args, TrainingArguments) and trainer.args.packing and trainer.args.max_length == 32
    assert len(trainer.train_dataset) < 16 and "seq_lengths" in trainer.train_dataset.column_names
    trainer.train()


def test_continued_pretraining_embedding_learning_rate(tiny_llama_dir, tmp_path):
    """The seed's CPT page: lm_head and embed_tokens train, with a 10x smaller learning rate of their own."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu")
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                        "embed_tokens"])
    before = _snapshot(model)
    trainer = UnslothTrainer(
        model=model, tokenizer=tokenizer, train_dataset=text_dataset(8), dataset_text_field="text",
        max_seq_length=32,
        args=UnslothTrainingArguments(**quiet_args(tmp_path, max_steps=2, learning_rate=5e-5, warmup_steps=0,
                                                   lr_scheduler_type="constant", embedding_learning_rate=5e-6)))
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
    embedding = {n: lr for n, lr in lrs.items() if "embed_tokens" in n or "lm_head" in n}
    others = {n: lr for n, lr in lrs.items() if n not in embedding}
    assert embedding and others
    assert all(lr == pytest.approx(5e-6) for lr in embedding.values())
    assert all(lr == pytest.approx(5e-5) for lr in others.values())
    assert _changed(model, {n: before[n] for n in before if "embed_tokens" in n})


def test_from_pretrained_max_seq_length_is_the_trainers_default_max_length(tmp_path):
    """The docs give the length once, to from_pretrained; the trainer cuts rows there unless
    max_length (or the old max_seq_length) is set explicitly."""
    from tiny.folders import tiny_folder

    model, tokenizer = tiny_lora(tiny_folder(tmp_path))  # from_pretrained(max_seq_length=64)
    dataset = text_dataset(4)
    settings = quiet_args(tmp_path / "out", max_steps=1)
    del settings["max_length"]
    inherited = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                           args=TrainingArguments(**settings))
    assert inherited.args.max_length == 64 != TrainingArguments(output_dir="unused", report_to="none").max_length
    explicit = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                          args=TrainingArguments(**settings, max_length=16))
    assert explicit.args.max_length == 16
    legacy = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, max_seq_length=24,
                        args=TrainingArguments(**settings))
    assert legacy.args.max_length == 24
