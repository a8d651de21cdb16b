"""Keywords the docs pass that transformers 5 / TRL 1.x dropped are accepted and mean what they meant."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainingArguments as HFTrainingArguments
from trl import SFTConfig

from velotune import SFTTrainer, TrainingArguments, UnslothTrainingArguments
from velotune.training.trainer import to_training_arguments


def quiet(**kwargs):
    return dict(output_dir="outputs", report_to="none", optim="adamw_torch", **kwargs)


@pytest.mark.parametrize("cls", [TrainingArguments, UnslothTrainingArguments])
def test_warmup_ratio_becomes_fractional_warmup_steps(cls, caplog):
    with caplog.at_level(logging.INFO, logger="velotune"):
        args = cls(**quiet(warmup_ratio=0.1, max_steps=50))
    assert args.warmup_steps == 0.1 and args.warmup_ratio is None
    assert args.get_warmup_steps(50) == 5  # what transformers 4 computed from warmup_ratio=0.1
    assert sum("warmup_ratio=0.1 -> warmup_steps=0.1" in r.getMessage() for r in caplog.records) == 1


def test_warmup_steps_wins_over_warmup_ratio_as_before(caplog):
    with caplog.at_level(logging.WARNING, logger="velotune"):
        args = TrainingArguments(**quiet(warmup_ratio=0.1, warmup_steps=5))
    assert args.warmup_steps == 5
    assert any("warmup_steps wins" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ratio", [1.5, -0.1, "0.1"])
def test_warmup_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(ValueError, match="warmup_ratio=.*fraction in \\[0, 1\\).*warmup_steps"):
        TrainingArguments(**quiet(warmup_ratio=ratio))


def test_old_names_of_renamed_fields():
    args = TrainingArguments(**quiet(max_seq_length=77, evaluation_strategy="steps", eval_steps=3))
    assert args.max_length == 77 and args.max_seq_length is None
    assert args.eval_strategy == "steps" and args.evaluation_strategy is None
    with pytest.raises(ValueError, match="max_seq_length=77 and max_length=64 disagree"):
        TrainingArguments(**quiet(max_seq_length=77, max_length=64))


def test_mapping_happens_once_through_the_trainers_conversion(caplog):
    """The trainer rebuilds the arguments (trainer keywords added): the old keyword is not mapped twice."""
    with caplog.at_level(logging.INFO, logger="velotune"):
        args = TrainingArguments(**quiet(warmup_ratio=0.2))
        again = to_training_arguments(args, {"dataset_num_proc": 1})
    assert again.warmup_steps == 0.2 and again.dataset_num_proc == 1
    assert sum("warmup_ratio" in r.getMessage() for r in caplog.records) == 1


def test_transformers_and_trl_arguments_convert():
    # TRL's SFTConfig defaults to bf16=True, which transformers refuses on a CPU-only machine
    for args in (HFTrainingArguments(output_dir="outputs", warmup_steps=0.1),
                 SFTConfig(output_dir="outputs", max_length=99, bf16=False)):
        ours = to_training_arguments(args, {"max_length": 50})
        assert isinstance(ours, TrainingArguments) and ours.max_length == 50


def test_sft_trainer_takes_the_docs_keywords(tiny_dir):
    """`SFTTrainer(model=, tokenizer=, dataset_text_field=, max_seq_length=, dataset_num_proc=, packing=,
    args=TrainingArguments(warmup_ratio=...))` as the docs write it."""
    from datasets import Dataset

    from .local import RAW_TEXT, tiny_model

    model, tokenizer = tiny_model(tiny_dir, r=8, lora_alpha=16)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=Dataset.from_list(RAW_TEXT),
                         dataset_text_field="text", max_seq_length=32, dataset_num_proc=1, packing=False,
                         args=TrainingArguments(**quiet(per_device_train_batch_size=2, warmup_ratio=0.5,
                                                        max_steps=2)))
    assert trainer.args.max_length == 32 and trainer.args.dataset_num_proc == 1 and not trainer.args.packing
    assert trainer.args.get_warmup_steps(2) == 1
    trainer.train()
    assert trainer.state.global_step == 2
