"""Every bad input of issue 4 fails (or is handled) with a message naming the problem and the fix."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset
from transformers import TrainingArguments as HFTrainingArguments

from velotune.training import SFTTrainer, TrainingArguments

from .helpers import quiet_args, text_dataset
from tiny.folders import tiny_lora


@pytest.mark.parametrize("setting, value", [
    ("learning_rate", 0), ("learning_rate", -1e-4), ("per_device_train_batch_size", 0),
    ("per_device_train_batch_size", -2), ("gradient_accumulation_steps", 0), ("embedding_learning_rate", -1e-5),
])
def test_zero_or_negative_rate_or_batch_is_refused(tmp_path, setting, value):
    with pytest.raises(ValueError, match=setting):
        TrainingArguments(**quiet_args(tmp_path, **{setting: value}))


def test_bad_settings_in_transformers_arguments_fail_before_any_work(tiny_llama_dir, tmp_path):
    """The seed passes transformers' TrainingArguments; the check runs before the dataset is touched."""
    model, tokenizer = tiny_lora(tiny_llama_dir)

    class Untouchable(Dataset):
        def map(self, *args, **kwargs):
            raise AssertionError("dataset work started before the arguments were checked")

    dataset = text_dataset(4)
    untouchable = Untouchable(dataset.data)
    args = HFTrainingArguments(output_dir=str(tmp_path), learning_rate=0.0, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="learning_rate=0.0"):
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=untouchable, dataset_text_field="text", args=args)
    assert not any(tmp_path.iterdir())


def test_missing_text_field_names_the_columns(tiny_llama_dir, tmp_path):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    dataset = Dataset.from_dict({"instruction": ["a"], "output": ["b"]})
    with pytest.raises(ValueError) as error:
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
                   args=TrainingArguments(**quiet_args(tmp_path)))
    assert "'text'" in str(error.value) and "['instruction', 'output']" in str(error.value)
    assert "dataset_text_field" in str(error.value)


def test_empty_dataset_is_refused(tiny_llama_dir, tmp_path):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    with pytest.raises(ValueError, match="empty"):
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=Dataset.from_dict({"text": []}),
                   args=TrainingArguments(**quiet_args(tmp_path)))


def test_dataset_empty_after_filtering_is_refused(tiny_llama_dir, tmp_path):
    """Prompt-completion rows whose prompt fills max_seq_length keep no trained token: nothing is left."""
    model, tokenizer = tiny_lora(tiny_llama_dir)
    dataset = Dataset.from_dict({"prompt": ["x" * 40, "y" * 50], "completion": ["ok", "no"]})
    with pytest.raises(ValueError, match="none of the 2 rows of the train dataset has a token to train on"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                   args=TrainingArguments(**quiet_args(tmp_path, max_length=16)))


def test_long_rows_are_truncated_with_a_count(tiny_llama_dir, tmp_path, caplog):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    dataset = Dataset.from_dict({"text": ["short", "m" * 40, "n" * 60, "tiny"]})
    with caplog.at_level(logging.WARNING, logger="velotune"):
        trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, max_seq_length=24,
                             args=TrainingArguments(**quiet_args(tmp_path, max_steps=1)))
    lines = [r.getMessage() for r in caplog.records if "longer than max_seq_length" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("velotune: 2 of 4 train rows") and "=24" in lines[0]
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == 24
    trainer.train()  # and it trains


def test_tokenizer_given_twice_differently_is_refused(tiny_llama_dir, tmp_path):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    from copy import deepcopy

    with pytest.raises(ValueError, match="tokenizer once"):
        SFTTrainer(model=model, tokenizer=tokenizer, processing_class=deepcopy(tokenizer),
                   train_dataset=text_dataset(4), args=TrainingArguments(**quiet_args(tmp_path)))
