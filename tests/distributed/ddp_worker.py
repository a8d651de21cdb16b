"""One training process of the DDP tests: velotune's SFTTrainer on a tiny Llama on the CPU.

Started by tests/distributed/test_ddp.py either as a plain process or by torchrun (gloo backend);
the same script runs both, so the single-process reference and the DDP run differ only in the launch.
The fast path and the offloading (reentrant-style) checkpoint are forced on the CPU, as on a GPU.
Each rank writes `result-<rank>.json` (losses, what DDP wrapped and all-reduced) into --out; rank 0's
final adapter is `--out/final/adapter_model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from velotune import FastLanguageModel, SFTTrainer, TrainingArguments
from velotune.fast.plan import plan_step, runtime_settings

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,"


def rows(n: int) -> list[str]:
    """Texts of varied length (batches need padding), the same on every rank."""
    rng = random.Random(0)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 30))) for _ in range(n)]


class FailAt(TrainerCallback):
    """A user's callback that raises on one rank at one step (the failing-rank test)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step + 1 == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def ddp_facts(trainer) -> dict:
    """What DDP wrapped: its settings and which parameters its reducer all-reduces."""
    wrapped = trainer.model_wrapped
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return {"wrapped": type(wrapped).__name__}
    reduced = {id(p) for p in wrapped._build_params_for_reducer()[0]}  # what the reducer all-reduces
    return {"wrapped": "DistributedDataParallel", "find_unused_parameters": wrapped.find_unused_parameters,
            "broadcast_buffers": wrapped.broadcast_buffers,
            "reduced": [n for n, p in wrapped.module.named_parameters() if id(p) in reduced],
            "trainable": [n for n, p in wrapped.module.named_parameters() if p.requires_grad],
            "frozen": sum(1 for _, p in wrapped.module.named_parameters() if not p.requires_grad)}


def load(folder: str, nf4: bool = False, cuda: bool = False):
    """The tiny Llama with LoRA and the offloading checkpoint from the first token; on the CPU the fast
    path is forced on. On CUDA each process's copy goes where velotune puts it (no device_map), in fp32."""
    placement = dict(dtype=torch.float32) if cuda else dict(device_map="cpu")
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=nf4, max_seq_length=64, **placement)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                             use_gradient_checkpointing="unsloth")
    settings = runtime_settings(model)
    settings.offload_min_tokens = 0
    if not cuda:
        settings.fast_path, settings.offload_on_cpu = True, True
    return model, tokenizer


def train(options, out: str, resume: bool = False, callbacks=None):
    """Build and run one trainer; returns it."""
    cuda = getattr(options, "cuda", False)
    model, tokenizer = load(options.folder, getattr(options, "nf4", False), cuda)
    save = dict(save_strategy="steps", save_steps=options.save_steps) if options.save_steps else dict(save_strategy="no")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=options.batch,
                             gradient_accumulation_steps=options.accum, max_steps=options.steps, learning_rate=1e-2,
                             logging_steps=1, report_to="none", optim="adamw_torch", seed=0, bf16=False, fp16=False,
                             disable_tqdm=True, dataset_num_proc=None, use_cpu=not cuda, max_length=64, ddp_timeout=120,
                             **save, **options.extra)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": rows(48)}),
                         args=args, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if args.should_save:
        trainer.save_model(str(Path(out) / "final"))
    return trainer


def report(trainer, out: str) -> None:
    """result-<rank>.json in `out`: the run's losses and what DDP did."""
    args = trainer.args
    plan = plan_step(trainer.model, training=True, grad=True, labels=True, tokens=64)
    result = {"rank": args.process_index, "world_size": args.world_size, "global_step": trainer.state.global_step,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "summary": trainer.summary.last_summary, "checkpoint": plan.checkpoint, "fast": plan.fast,
              "device": str(next(trainer.model.parameters()).device),
              **ddp_facts(trainer)}
    (Path(out) / f"result-{args.process_index}.json").write_text(json.dumps(result))


def references(options) -> None:
    """The one-process runs a DDP run (in --references) is compared with, in one process: global batch
    4 as batch 4, as batch 2 x accumulation 2, and batch 4 resuming the DDP run's first checkpoint."""
    ddp = Path(options.references)
    options.batch, options.accum = 4, 1
    report(train(options, options.out + "/batch4"), options.out + "/batch4")
    options.batch, options.accum = 2, 2
    report(train(options, options.out + "/accum2"), options.out + "/accum2")
    options.batch, options.accum = 4, 1
    resumed = Path(options.out) / "resumed1"
    shutil.copytree(ddp / f"checkpoint-{options.resume_from}", resumed / f"checkpoint-{options.resume_from}")
    report(train(options, str(resumed), resume=True), str(resumed))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--resume-from", default=None, help="then resume on these ranks from this checkpoint step")
    parser.add_argument("--find-unused", action="store_true", help="ddp_find_unused_parameters=True")
    parser.add_argument("--nf4", action="store_true", help="load the base weights in NF4 (QLoRA)")
    parser.add_argument("--cuda", action="store_true", help="train on the GPUs (NCCL), one per rank")
    parser.add_argument("--references", default=None, help="a DDP run's --out: run its one-process references")
    options = parser.parse_args()
    options.extra = {"ddp_find_unused_parameters": True} if options.find_unused else {}
    torch.set_num_threads(1)
    if options.references:
        return references(options)
    callbacks = [FailAt(options.fail_rank, options.fail_step)] if options.fail_rank >= 0 else None
    trainer = train(options, options.out, options.resume, callbacks)
    report(trainer, options.out)
    if options.resume_from:
        # The same ranks resume a copy of one of this run's checkpoints in a fresh output_dir.
        again = Path(options.out) / "resumed"
        if trainer.args.process_index == 0:
            shutil.copytree(Path(options.out) / f"checkpoint-{options.resume_from}",
                            again / f"checkpoint-{options.resume_from}")
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
        report(train(options, str(again), resume=True), str(again))


if __name__ == "__main__":
    main()
