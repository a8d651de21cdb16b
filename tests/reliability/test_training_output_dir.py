"""output_dir safety (issue 14, items 3 and 4, hub_token): velotune deletes and overwrites only what it
wrote, one run holds a folder at a time (a dead run's lock does not stick), secrets never reach files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from velotune.training import SFTTrainer, TrainingArguments
from velotune.training.checkpoints import MARKER, STAGING
from velotune.training.run_lock import LOCK_NAME, OutputDirInUseError

from training.helpers import quiet_args, text_dataset
from tiny.folders import tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")



def _trainer(folder, output_dir, **overrides):
    model, tokenizer = tiny_lora(folder)
    args = TrainingArguments(**quiet_args(output_dir, **overrides))
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(12, seed=5), args=args)


def test_rotation_and_model_card_leave_user_files_alone(tiny_llama_dir, tmp_path):
    notes = tmp_path / "checkpoint-notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("mine")
    foreign = tmp_path / "checkpoint-1000"  # numbered, but not written by velotune (copied from elsewhere)
    foreign.mkdir()
    (foreign / "weights.bin").write_text("mine too")
    (tmp_path / "README.md").write_text("# my project notes\n")
    (tmp_path / "training_loss.png").write_bytes(b"my own picture")

    trainer = _trainer(tiny_llama_dir, tmp_path, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer.train()
    trainer.save_model()  # PEFT's save_pretrained would rewrite README.md as its model card

    assert (notes / "ideas.txt").read_text() == "mine"
    assert (foreign / "weights.bin").read_text() == "mine too"
    assert (tmp_path / "README.md").read_text() == "# my project notes\n"
    assert (tmp_path / "training_loss.png").read_bytes() == b"my own picture"
    ours = sorted(p.name for p in tmp_path.glob("checkpoint-*") if (p / MARKER).is_file())
    assert ours == ["checkpoint-3"]  # rotation still works on velotune's own checkpoints
    assert not (tmp_path / STAGING).exists()


def test_keeping_only_the_best_checkpoint_leaves_user_folders_alone(tiny_llama_dir, tmp_path):
    """save_total_limit=1 with load_best_model_at_end: transformers' end-of-run cleanup would delete every
    folder matching checkpoint-<n>*; velotune keeps the best of its own checkpoints and touches nothing else."""
    backup = tmp_path / "checkpoint-2-backup"
    backup.mkdir()
    (backup / "keep.txt").write_text("mine")
    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1,
                                          eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                                          metric_for_best_model="loss", save_total_limit=1))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(12, seed=5),
                         eval_dataset=text_dataset(4, seed=9), args=args)
    trainer.train()
    assert (backup / "keep.txt").read_text() == "mine"
    ours = [p.name for p in tmp_path.glob("checkpoint-*") if (p / MARKER).is_file()]
    assert ours == [os.path.basename(trainer.state.best_model_checkpoint)]
    assert trainer.args.save_total_limit == 1


def test_a_model_card_velotune_wrote_is_rewritten(tiny_llama_dir, tmp_path):
    from velotune.training.trainer import MODEL_CARD_SIGNATURE

    _trainer(tiny_llama_dir, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    card = tmp_path / "README.md"
    assert card.read_text().count(MODEL_CARD_SIGNATURE) == 1
    card.write_text(card.read_text().replace("---", "--- ", 1))  # ours, edited: still ours
    _trainer(tiny_llama_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=1).train(resume_from_checkpoint=True)
    assert card.read_text().count(MODEL_CARD_SIGNATURE) == 1 and "--- " not in card.read_text()


# Another process holding the lock; run_lock.py is loaded by path (stdlib only), so it starts in a blink.
HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
    run_lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_lock)
    lock = run_lock.RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(120)
""")


def test_second_run_into_a_folder_in_use_fails_at_once_naming_folder_and_pid(tiny_llama_dir, tmp_path):
    import velotune.training.run_lock as run_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), run_lock.__file__], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as caught:
            _trainer(tiny_llama_dir, tmp_path, max_steps=1)
        message = str(caught.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is stale and the next run takes it over.
    trainer = _trainer(tiny_llama_dir, tmp_path, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tiny_llama_dir, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": None,
                                                  "run": "old", "since": "earlier"}))
    # What a run killed during a save leaves behind: its own staging folder.
    (tmp_path / STAGING / "old" / "checkpoint-1").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        _trainer(tiny_llama_dir, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    assert "taking over the lock" in caplog.text
    assert not (tmp_path / STAGING).exists()
    assert (tmp_path / "checkpoint-1" / MARKER).is_file()


def test_staging_folders_are_unique_per_run(tiny_llama_dir, tmp_path):
    seen = []

    class Spy(SFTTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            seen.append(os.path.relpath(output_dir, tmp_path))
            super()._save_optimizer_and_scheduler(output_dir)

    for _ in range(2):
        model, tokenizer = tiny_lora(tiny_llama_dir)
        args = TrainingArguments(**quiet_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1))
        Spy(model=model, processing_class=tokenizer, train_dataset=text_dataset(8), args=args).train(
            resume_from_checkpoint=None)
    assert len(seen) == 2 and all(s.startswith(STAGING + os.sep) for s in seen)
    assert seen[0].split(os.sep)[1] != seen[1].split(os.sep)[1]


def test_hub_token_never_reaches_training_args_bin(tiny_llama_dir, tmp_path):
    secret = "hf_SECRETdoNotWrite123"
    trainer = _trainer(tiny_llama_dir, tmp_path, max_steps=1, save_strategy="steps", save_steps=1, hub_token=secret)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert trainer.args.hub_token == secret  # still usable by this process (push_to_hub)
