"""Resuming (issue 14, item 5 and the resume items): a finished run stays finished, a checkpoint of
another LoRA shape is named before anything loads."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from velotune import FastLanguageModel
from velotune.training import SFTTrainer, TrainingArguments

from training.helpers import quiet_args, text_dataset
from tiny.folders import tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")



def _lora(folder, r):
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=16, use_gradient_checkpointing=False), tokenizer


def _trainer(folder, output_dir, r=8, **overrides):
    model, tokenizer = tiny_lora(folder) if r == 8 else _lora(folder, r)
    settings = {"max_steps": 3, "save_strategy": "steps", "save_steps": 1, **overrides}
    args = TrainingArguments(**quiet_args(output_dir, **settings))
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(16, seed=2), args=args)


def _files(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("same_trainer", [True, False])
def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_llama_dir, tmp_path, caplog, same_trainer):
    first = _trainer(tiny_llama_dir, tmp_path)
    first.train()
    finished = _adapters(first.model)
    before = _files(tmp_path)

    again = first if same_trainer else _trainer(tiny_llama_dir, tmp_path)  # the same script run a second time
    with caplog.at_level(logging.WARNING, logger="velotune"):
        result = again.train(resume_from_checkpoint=True)
    assert "already complete" in caplog.text
    assert again.state.global_step == 3 and result.global_step == 3
    assert _files(tmp_path) == before  # nothing written, nothing deleted
    now = _adapters(again.model)
    for name, value in finished.items():  # the model holds the finished run's weights
        torch.testing.assert_close(now[name], value, rtol=0, atol=0, msg=name)
    saved = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    assert len(saved) > 0


def test_a_longer_max_steps_still_continues(tiny_llama_dir, tmp_path):
    _trainer(tiny_llama_dir, tmp_path).train()
    longer = _trainer(tiny_llama_dir, tmp_path, max_steps=5)
    longer.train(resume_from_checkpoint=True)
    assert longer.state.global_step == 5 and (tmp_path / "checkpoint-5").is_dir()


def test_resuming_with_another_rank_names_both_and_the_fix(tiny_llama_dir, tmp_path):
    _trainer(tiny_llama_dir, tmp_path, max_steps=2).train()
    other = _trainer(tiny_llama_dir, tmp_path, r=4, max_steps=4)
    with pytest.raises(ValueError, match=r"r=8 \(the model has 4\).*get_peft_model with r=8"):
        other.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_true_picks_velotunes_newest_checkpoint_not_a_users_folder(tiny_llama_dir, tmp_path):
    _trainer(tiny_llama_dir, tmp_path, max_steps=2).train()
    foreign = tmp_path / "checkpoint-1000"  # a user's folder; transformers would resume from it
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    resumed = _trainer(tiny_llama_dir, tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and (tmp_path / "checkpoint-4").is_dir()
    assert (foreign / "notes.txt").read_text() == "mine"
