"""One process of the FSDP2-through-the-trainer test: velotune's SFTTrainer with `fsdp=True` on a tiny Llama.

Under torchrun (2 ranks, gloo) it trains LoRA and full fine-tuning sharded, each with distributed
checkpoints at steps 2 and 4, then resumes a copy of each step-2 checkpoint on the same 2 ranks; and
LoRA with batch 1 x gradient accumulation 2 per rank (the same global batch), and LoRA ending on its
"best" (step-2) checkpoint (load_best_model_at_end).
As one plain process (--references DIR) it trains the same runs unsharded with the same global batch,
resumes the 2-rank step-2 checkpoints on 1 process, and consolidates the 2-rank step-4 checkpoints.
Each run writes `result-<rank>.json` (losses, what was sharded) into its folder; rank 0's final
weights are `final/` (gathered by trainer.save_model).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from velotune import FastLanguageModel, SFTTrainer, TrainingArguments
from velotune.fast.plan import plan_step, runtime_settings

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,"
STEPS, SAVE_AT = 4, 2
BF16 = False  # --bf16 (GPUs): bf16 weights, bf16 compute, fp32 gradient reduction (the mixed-precision policy)
CPU_LOAD = False  # --cpu-load (GPUs): from_pretrained into host memory, the trainer's sharding moves it to the GPUs


def rows(n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 30))) for _ in range(n)]


def load(folder: str, full: bool, cuda: bool = False):
    """LoRA with the offloading checkpoint, or every weight training; the fast path forced on the CPU. On CUDA
    each rank's copy goes where velotune puts it (its own GPU), in fp32, the fast path as it decides."""
    placement = dict(dtype=torch.bfloat16 if BF16 else torch.float32) if cuda else dict(device_map="cpu")
    if cuda and CPU_LOAD:
        placement["device_map"] = "cpu"  # into host memory; sharding moves each rank's shards to its GPU
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=False, max_seq_length=64,
                                                         full_finetuning=full, **placement)
    if not full:
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                                 use_gradient_checkpointing="unsloth")
    settings = runtime_settings(model)
    settings.offload_min_tokens = 0
    if not cuda:
        settings.fast_path, settings.offload_on_cpu = True, True
    return model, tokenizer


def sharding_facts(trainer) -> dict:
    """Which weights are DTensors, and how much of one optimizer state this rank holds."""
    from torch.distributed.tensor import DTensor

    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    name, param = trainable[0]
    state = optimizer.state[param]["exp_avg"]
    local = state.to_local() if isinstance(state, DTensor) else state
    return {"wrapped": type(trainer.model_wrapped).__name__,
            "trainable": len(trainable), "trainable_dtensor": sum(isinstance(p, DTensor) for _, p in trainable),
            "frozen_dtensor": sum(isinstance(p, DTensor) for _, p in model.named_parameters() if not p.requires_grad),
            "state_param": name, "state_local": local.numel(), "state_full": param.numel()}


def train(options, out: Path, full: bool, batch: int, fsdp: bool, resume: bool = False, accum: int = 1,
          **extra):
    model, tokenizer = load(options.folder, full, options.cuda)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=STEPS,
                             gradient_accumulation_steps=accum,
                             learning_rate=1e-3 if full else 1e-2, logging_steps=1, report_to="none",
                             optim="adamw_torch", seed=0, bf16=BF16, fp16=False, disable_tqdm=True,
                             dataset_num_proc=None, use_cpu=not options.cuda, max_length=64, ddp_timeout=120,
                             save_strategy="steps", save_steps=SAVE_AT, eval_strategy="steps", eval_steps=SAVE_AT,
                             per_device_eval_batch_size=1, **({"fsdp": True} if fsdp else {}), **extra)
    data = Dataset.from_dict({"text": rows(56)})  # the last 8 rows are held out: evaluated on the sharded model too
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data.select(range(48)),
                         eval_dataset=data.select(range(48, 56)), args=args)
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(out / "final"))  # every rank: a sharded model is gathered first
    plan = plan_step(trainer.model, training=True, grad=True, labels=True, tokens=64)
    result = {"rank": args.process_index, "world_size": args.world_size, "global_step": trainer.state.global_step,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "fast": plan.fast,
              "eval_losses": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e],
              "per_layer": plan.per_layer, "device": str(next(trainer.model.parameters()).device),
              **sharding_facts(trainer)}
    (out / f"result-{args.process_index}.json").write_text(json.dumps(result))
    return trainer


def resume_copy(source: Path, target: Path, rank0: bool) -> None:
    """A fresh output_dir holding only `source`'s step-2 checkpoint (rank 0 copies; all ranks wait)."""
    if rank0:
        shutil.copytree(source / f"checkpoint-{SAVE_AT}", target / f"checkpoint-{SAVE_AT}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--references", default=None, help="the 2-rank run's --out: run the one-process side")
    parser.add_argument("--cuda", action="store_true", help="train on the GPUs (NCCL), one per rank")
    parser.add_argument("--bf16", action="store_true", help="with --cuda: bf16 weights and bf16=True")
    parser.add_argument("--cpu-load", action="store_true", help="with --cuda: load into host memory first")
    parser.add_argument("--fsdp2-out", default=None,
                        help="first run fsdp2_worker.py's job (fast path) in these processes, writing into this folder")
    options = parser.parse_args()
    global BF16, CPU_LOAD
    BF16 = options.bf16
    CPU_LOAD = options.cpu_load
    torch.set_num_threads(1)
    if options.fsdp2_out is not None:  # under torchrun it makes the process group the trainers then use
        from fsdp2_worker import run as fsdp2_run

        fsdp2_run(options.folder, options.fsdp2_out, fast=True, keep_group=True)
    out = Path(options.out)
    if options.references is None:  # under torchrun: 2 ranks x batch 2, sharded
        for kind, full in (("lora", False), ("full", True)):
            trainer = train(options, out / kind, full, batch=2, fsdp=True)
            resume_copy(out / kind, out / kind / "resumed", trainer.args.process_index == 0)
            train(options, out / kind / "resumed", full, batch=2, fsdp=True, resume=True)
        # batch 1 x accumulation 2: the reduce-scatter waits for the window's last micro-batch (ShardedModel.no_sync)
        train(options, out / "lora-accum", False, batch=1, fsdp=True, accum=2)
        # the "best" checkpoint by a metric that prefers step 2's higher eval loss: the run ends on step 2's weights
        train(options, out / "lora-best", False, batch=2, fsdp=True, load_best_model_at_end=True,
              metric_for_best_model="eval_loss", greater_is_better=True)
        return
    from velotune.training.checkpoints_dcp import consolidate

    sharded = Path(options.references)
    for kind, full in (("lora", False), ("full", True)):
        train(options, out / kind, full, batch=4, fsdp=False)  # the unsharded reference, global batch 4
        resume_copy(sharded / kind, out / kind / "resumed1", True)
        train(options, out / kind / "resumed1", full, batch=4, fsdp=True, resume=True)  # 2-rank checkpoint, 1 process
        consolidate(sharded / kind / f"checkpoint-{STEPS}", out / kind / "consolidated")
    consolidate(sharded / "lora-best" / f"checkpoint-{SAVE_AT}", out / "lora-best" / "consolidated")


if __name__ == "__main__":
    main()
