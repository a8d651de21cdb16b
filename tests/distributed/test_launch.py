"""The launch environment and its bad input (issue 19): what each rank reads from torchrun's variables,
`device_map="auto"` under a launcher, more processes than GPUs, and the DDP setting that cannot work
with the offloading checkpoint. No process group is started: every check runs before one would be."""

from __future__ import annotations

import pytest
import torch

from velotune import FastLanguageModel, SFTTrainer, TrainingArguments
from velotune.launch import Launch, check_gpu_count, current, process_device

from .ddp_worker import rows


def launch_env(monkeypatch, world=2, rank=0, local_rank=0, local_world=2):
    for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(name, str(value))


def test_plain_process_and_torchrun_ranks(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert current() == Launch() and not current().distributed and current().main
    # Second node of `torchrun --nnodes 2 --nproc_per_node 8`: global rank 11 is local rank 3.
    launch_env(monkeypatch, world=16, rank=11, local_rank=3, local_world=8)
    here = current()
    assert (here.distributed, here.main, here.nodes, here.local_rank) == (True, False, 2, 3)
    assert process_device(None, here) == (torch.device("cuda", 3) if torch.cuda.is_available() else torch.device("cpu"))


def test_bad_launch_environment_is_named(monkeypatch):
    launch_env(monkeypatch, world=2, rank=2)
    with pytest.raises(ValueError, match=r"RANK=2, WORLD_SIZE=2"):
        current()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match=r"RANK='one' must be an integer"):
        current()


def test_more_processes_than_gpus_names_both_numbers():
    with pytest.raises(ValueError, match=r"4 processes were launched on this machine but it has 2 GPU\(s\).*"
                                         r"--nproc_per_node 2"):
        check_gpu_count(Launch(world_size=8, rank=5, local_rank=1, local_world_size=4), gpus=2)
    check_gpu_count(Launch(world_size=2, local_world_size=2), gpus=2)  # one per GPU: fine
    check_gpu_count(Launch(world_size=2, local_world_size=2), gpus=0)  # the CPU (gloo): no limit


def test_device_map_auto_under_a_launcher_explains_both_ways(monkeypatch, ddp_tiny_dir):
    launch_env(monkeypatch, rank=1, local_rank=1)
    with pytest.raises(ValueError) as error:
        FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="auto")
    text = str(error.value)
    assert "rank 1 of a 2-process launch" in text
    assert "drop device_map" in text and "LOCAL_RANK" in text  # way 1: one copy per GPU
    assert "single process" in text  # way 2: one model over the GPUs, no launcher
    model, _ = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="cpu")
    assert next(model.parameters()).device.type == "cpu"  # an explicit CPU copy per rank stays allowed (gloo)


def test_find_unused_parameters_with_the_offloading_checkpoint_is_refused(monkeypatch, ddp_tiny_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    # The arguments (and the process state they set up) before the launch variables: no process group starts.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, max_length=64,
                             ddp_find_unused_parameters=True)
    launch_env(monkeypatch)
    with pytest.raises(ValueError, match=r"ddp_find_unused_parameters=True cannot train with "
                                         r"use_gradient_checkpointing='unsloth'.*Leave ddp_find_unused_parameters unset"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": rows(4)}),
                   args=args)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_find_unused_parameters_sends_checkpointing_true_through_torchs_checkpoint(monkeypatch, ddp_tiny_dir, tmp_path):
    """use_gradient_checkpointing=True runs velotune's reentrant-style checkpoint on the fast path, which DDP's
    find_unused_parameters=True would fail on as it does on "unsloth"'s: there the launch check makes the plan use
    torch's non-reentrant checkpoint instead (and leaves velotune's function in place otherwise)."""
    from velotune.fast.plan import plan_step
    from velotune.training.distributed import check_launch

    model, _ = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="cpu",
                                                 max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, max_length=64,
                             ddp_find_unused_parameters=True)
    launch_env(monkeypatch)
    step = dict(training=True, grad=True, tokens=64, fast_path=True)
    assert plan_step(model, **step).checkpoint == "keep"
    check_launch(args, model)
    assert plan_step(model, **step).checkpoint == "plain"
    args.ddp_find_unused_parameters = False
    check_launch(args, model)
    assert plan_step(model, **step).checkpoint == "keep"
