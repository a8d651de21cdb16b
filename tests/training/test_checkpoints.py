"""Checkpoints: Ctrl-C saves and resuming continues exactly, writes are atomic, adapters reload for training."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from velotune import FastLanguageModel
from velotune.training import NonFiniteLossError, SFTTrainer, TrainingArguments

from .helpers import losses, quiet_args, text_dataset
from tiny.folders import tiny_lora

STEPS = 6


class CtrlCAt(TrainerCallback):
    """Sends this process a real SIGINT during the given step (as a terminal's Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _trainer(folder, output_dir, callbacks=(), **overrides):
    model, tokenizer = tiny_lora(folder)
    settings = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": 2, **overrides}
    args = TrainingArguments(**quiet_args(output_dir, **settings))
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(24, seed=7), args=args,
                      callbacks=list(callbacks))


def test_ctrl_c_saves_and_resume_continues_exactly(tiny_llama_dir, tmp_path):
    straight = _trainer(tiny_llama_dir, tmp_path / "straight")
    straight.train()
    expected = losses(straight)
    assert len(expected) == STEPS

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in the background (CI)
    interrupted = _trainer(tiny_llama_dir, tmp_path / "run", callbacks=[CtrlCAt(3)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert get_last_checkpoint(str(tmp_path / "run")).endswith("checkpoint-3")  # saved at the step boundary
    assert losses(interrupted) == pytest.approx(expected[:3], abs=1e-6)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    resumed = _trainer(tiny_llama_dir, tmp_path / "run")  # a fresh process would build the same objects
    resumed.train(resume_from_checkpoint=True)
    assert losses(resumed)[-3:] == pytest.approx(expected[3:], abs=1e-5)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class FailingSaveTrainer(SFTTrainer):
    """Crashes while writing the optimizer state of the second checkpoint (a full disk, a killed job)."""

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full")
        super()._save_optimizer_and_scheduler(output_dir)


def test_crash_mid_save_leaves_no_complete_looking_checkpoint(tiny_llama_dir, tmp_path):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, max_steps=STEPS, save_strategy="steps", save_steps=2))
    trainer = FailingSaveTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(24, seed=7),
                                 args=args)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    complete = tmp_path / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in complete.iterdir()}
    # The next run resumes from the last whole checkpoint and finishes.
    resumed = _trainer(tiny_llama_dir, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS and (tmp_path / "checkpoint-4").is_dir()


def test_checkpoint_folder_reloads_for_further_training(tiny_llama_dir, tmp_path):
    trainer = _trainer(tiny_llama_dir, tmp_path, max_steps=2)
    trainer.train()
    saved = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "checkpoint-2"), load_in_4bit=False,
                                                         device_map="cpu")
    reloaded = dict(model.named_parameters())
    assert saved and all(torch.equal(reloaded[n], saved[n]) for n in saved)
    assert all(reloaded[n].requires_grad for n in saved)
    again = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(8, seed=1),
                       args=TrainingArguments(**quiet_args(tmp_path / "more", max_steps=1)))
    again.train()
    assert any(not torch.equal(p, saved[n]) for n, p in model.named_parameters() if n in saved)


def test_non_finite_loss_stops_with_step_and_rows(tiny_llama_dir, tmp_path):
    """A poisoned embedding row makes one sample's loss NaN: stop, name the step and rows, keep the checkpoint."""
    model, tokenizer = tiny_lora(tiny_llama_dir)
    texts = ["abcdefgh"] * 12
    texts[9] = "abc~defgh"  # '~' is poisoned below
    poisoned = tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = float("nan")
    from datasets import Dataset

    args = TrainingArguments(**quiet_args(tmp_path, max_steps=STEPS, save_strategy="steps", save_steps=1,
                                          per_device_train_batch_size=2))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
                         args=args)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    step = trainer.state.global_step + 1
    assert f"at step {step} " in message and "rows [" in message
    rows = eval(message.split("rows ")[1].split("]")[0] + "]")  # noqa: S307 - our own message
    assert 9 in rows and len(rows) == 2
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in range(1, step)]
    assert all(torch.isfinite(p).all() for n, p in trainer.model.named_parameters() if "lora_" in n)
