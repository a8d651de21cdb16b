"""Numbers and calls that used to be accepted and then blamed on something else (issue 14, "confusing
today", training side): NaN/inf arguments, max_steps=0, a second get_peft_model."""

from __future__ import annotations

import math

import pytest

from velotune import FastLanguageModel
from velotune.training import TrainingArguments

from training.helpers import quiet_args


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                             max_seq_length=64)


@pytest.mark.parametrize("name", ["learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon",
                                  "adam_beta2", "num_train_epochs"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_training_numbers_are_refused_by_name(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r}: must be a finite"):
        TrainingArguments(**quiet_args(tmp_path, **{name: value}))


def test_max_steps_zero_is_an_error_not_a_one_step_run(tmp_path):
    with pytest.raises(ValueError, match=r"max_steps=0: .* -1 to train num_train_epochs"):
        TrainingArguments(**quiet_args(tmp_path, max_steps=0))
    assert TrainingArguments(**quiet_args(tmp_path, max_steps=-1)).max_steps == -1


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_lora_alpha_is_refused(base, value):
    model, _ = base
    with pytest.raises(ValueError, match=r"lora_alpha=.*finite positive"):
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=value, use_gradient_checkpointing=False)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # the model is untouched


def test_second_get_peft_model_says_what_happened_and_what_to_do(tiny_llama_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                 max_seq_length=64)
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match=r"already has LoRA adapters \(r=8.*without calling get_peft_model again"):
        FastLanguageModel.get_peft_model(peft, r=16)
    # The base object the first call modified in place (a notebook cell run twice on `model`).
    with pytest.raises(ValueError, match=r"already holds LoRA layers.*earlier get_peft_model call"):
        FastLanguageModel.get_peft_model(model, r=16)


def test_a_model_folder_without_tokenizer_files_says_what_to_do(tmp_path):
    from tiny.folders import write_tiny_llama

    folder = tmp_path / "weights-only"
    write_tiny_llama(folder)
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    with pytest.raises(FileNotFoundError, match=r"holds a model but no tokenizer files.*tokenizer.save_pretrained"):
        FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu")
