"""Data that would train on nothing or on the wrong thing (issue 14, items 6 and 7, and the data items of
"confusing today"): each is counted, converted with a notice, or refused naming the file/row and the fix."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset

from velotune.data.loading import DataFormatError, load_local_dataset
from velotune.training import SFTTrainer, TrainingArguments

from training.helpers import quiet_args, text_rows
from tiny.folders import tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")



def _trainer(folder, output_dir, dataset, tokenizer_hook=None, **overrides):
    model, tokenizer = tiny_lora(folder)
    if tokenizer_hook is not None:
        tokenizer_hook(tokenizer)
    args = TrainingArguments(**quiet_args(output_dir, **{"max_steps": 2, **overrides}))
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)


def test_all_empty_text_is_an_error_before_training(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"none of the 3 rows .* token to train on.*rows 0, 1, 2"):
        _trainer(tiny_llama_dir, tmp_path, Dataset.from_dict({"text": ["", "", ""]}))
    assert not any(tmp_path.glob("checkpoint-*"))


def test_some_empty_rows_are_counted_named_and_skipped(tiny_llama_dir, tmp_path, caplog):
    rows = text_rows(8, seed=1)
    rows[2] = rows[5] = ""
    with caplog.at_level(logging.WARNING, logger="velotune"):
        trainer = _trainer(tiny_llama_dir, tmp_path, Dataset.from_dict({"text": rows}))
    assert "2 of 8 train rows have no token to train on" in caplog.text and "rows 2, 5" in caplog.text
    assert len(trainer.train_dataset) == 6
    trainer.train()
    assert all(entry["loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_rows_whose_completion_is_masked_away_count_as_empty(tiny_llama_dir, tmp_path):
    # Pre-tokenized prompt-completion rows; row 1's completion mask is empty, row 2 trains only its first token
    # (which the label shift never predicts).
    data = Dataset.from_dict({"input_ids": [[10, 11, 12, 13], [10, 11, 12], [14, 15, 16]],
                              "completion_mask": [[0, 0, 1, 1], [0, 0, 0], [1, 0, 0]]})
    with pytest.raises(ValueError, match=r"none of the 2 rows"):
        _trainer(tiny_llama_dir, tmp_path, data.select([1, 2]))
    trainer = _trainer(tiny_llama_dir, tmp_path, data)
    assert len(trainer.train_dataset) == 1


CHATML = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '</s>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")


def _with_template(tokenizer):
    tokenizer.chat_template = CHATML


def test_raw_sharegpt_rows_are_standardized_with_a_notice(tiny_llama_dir, tmp_path, caplog):
    conversations = [[{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"answer {i}"}] for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="velotune"):
        trainer = _trainer(tiny_llama_dir, tmp_path, Dataset.from_dict({"conversations": conversations}),
                           tokenizer_hook=_with_template)
    assert "standardize_sharegpt" in caplog.text
    text = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"]).replace(" ", "")
    assert "[user]" in text and "[assistant]" in text
    assert "human" not in text and "gpt" not in text


def test_unknown_roles_are_refused_with_the_fix(tiny_llama_dir, tmp_path):
    conversations = [[{"from": "narrator", "value": "once"}, {"from": "gpt", "value": "upon"}]]
    with pytest.raises(ValueError, match="narrator.*standardize_sharegpt"):
        _trainer(tiny_llama_dir, tmp_path, Dataset.from_dict({"conversations": conversations}),
                 tokenizer_hook=_with_template)


def test_a_none_text_row_is_named(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) of the train dataset: 'text' is None"):
        _trainer(tiny_llama_dir, tmp_path, Dataset.from_dict({"text": ["abc", None, "def"]}))


def test_non_utf8_bytes_in_jsonl_name_file_and_row(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "fine"}).encode(), b'{"text": "caf\xe9"}', json.dumps({"text": "ok"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError) as caught:
        load_local_dataset(path)
    assert caught.value.row == 2 and str(path) in str(caught.value) and "UTF-8" in str(caught.value)


def test_responses_only_error_names_truncation_when_it_is_the_cause(tiny_llama_dir, tmp_path):
    from velotune.chat_templates import train_on_responses_only
    from velotune.data.masking import ResponseMarkerError

    long_prompt = "x" * 80  # the tiny tokenizer is per character: the marker comes after max_length=64
    data = Dataset.from_dict({"text": [f"<u>{long_prompt}<a>answer</s>"] * 4})
    trainer = _trainer(tiny_llama_dir, tmp_path, data)
    with pytest.raises(ResponseMarkerError, match=r"max_seq_length=64 tokens long: they were truncated"):
        train_on_responses_only(trainer, instruction_part="<u>", response_part="<a>")


def test_standard_messages_pass_untouched_and_human_gpt_roles_are_mapped():
    from velotune.training.dataset_prep import standardize_roles

    standard = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": None},
                                                {"role": "tool", "content": "42"}]]})
    assert standardize_roles(standard, "train") is standard
    aliased = Dataset.from_dict({"messages": [[{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]]})
    assert [m["role"] for m in standardize_roles(aliased, "train")[0]["messages"]] == ["user", "assistant"]
