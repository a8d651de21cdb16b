"""Full fine-tuning of the Llama-3.1-8B shape sharded with FSDP2 over the GPUs of one machine (issue 19 item 5).

Two engines on the same settings (random bf16 weights, every weight trained, AdamW, random tokens,
activation checkpointing per decoder layer, bf16 compute, fp32 gradient reduction):

* velotune: our Llama, sharded by `velotune.training.fsdp.shard` (what `SFTTrainer(fsdp=True)` runs:
  `fully_shard` per decoder layer, then the model), stepped by a plain loop;
* peer: transformers' own LlamaForCausalLM under plain `transformers.Trainer` with `fsdp=True`,
  `fsdp_config={"version": 2, ...}` (accelerate's FSDP2), the same batch, steps and optimizer, bf16
  weights trained as they are (accelerate's FSDP2 without mixed precision also reduces in bf16);
* peer-amp: the same with `bf16=True`, accelerate's mixed precision (fp32 master weights and optimizer
  state, bf16 autocast): what a transformers user gets by default, at twice the weight memory.

With one process the model is not sharded (does it fit on one GPU at all: an out-of-memory is
recorded as such). One process count and engine per torchrun launch (clean allocators); rank 0
prints a RESULT line: tokens/s over all GPUs and each GPU's peak allocated / reserved memory.

  PYTHONPATH=src python bench/bench_fsdp.py --nprocs 1,2 --engines velotune,peer --json fsdp.json
  PYTHONPATH=src python bench/bench_fsdp.py --dry-run    # tiny shape, 2 CPU processes (gloo), both engines
On the CPU (the dry run) accelerate does not turn FSDP on (its CPU launches are DDP): the peer's record
says which engine really ran (`ran`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def llama_config(shape: str):
    import torch
    from transformers import LlamaConfig

    sys.path.insert(0, str(HERE))
    from bench_train import SHAPES

    return LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       dtype=torch.bfloat16, **SHAPES[shape])  # fmt: skip


def build(cls, config, device, cuda: bool):
    """`cls` (ours or transformers') with random weights made directly in the run's dtype, all training."""
    import torch

    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = cls(config)
    torch.set_default_dtype(default)
    model.requires_grad_(True)
    return model


def batches(args, vocab: int, rank: int, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank its own data
    while True:
        ids = torch.randint(4, min(vocab, 32000), (args.batch, args.seq), generator=gen)
        yield ids.to(device)


def peak(cuda: bool) -> dict:
    import torch

    gib = 2 ** 30
    if not cuda:
        return dict(peak_gib=None, reserved_gib=None)
    return dict(peak_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
                reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2))


def run_velotune(args, cuda: bool, world: int, rank: int, local_rank: int) -> dict:
    """velotune's sharding (the trainer's function) and a plain training loop; times optimizer steps."""
    import torch

    from velotune.fast.plan import plan_step
    from velotune.models.families import LlamaForCausalLM
    from velotune.models.rope import RotaryEmbedding
    from velotune.training import fsdp

    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = build(LlamaForCausalLM, llama_config(args.shape), device, cuda)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()  # fp32 inverse frequencies, as loading leaves them
    model.gradient_checkpointing_enable()
    model.train()
    if world > 1:
        fsdp.shard(model, fsdp.Sharding(), SimpleNamespace(bf16=cuda))
    decision = plan_step(model, training=True, grad=True, labels=True, tokens=args.batch * args.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    data = batches(args, model.config.vocab_size, rank, device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for micro in range(args.accum):
            ids = next(data)
            sync = micro == args.accum - 1
            if world > 1:
                model.set_requires_gradient_sync(sync)  # reduce-scatter once, in the last micro-batch's backward
            loss = model(input_ids=ids, labels=ids).loss
            (loss / args.accum).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        if step == 0 and cuda:
            torch.cuda.reset_peak_memory_stats()  # steady state: after the first step created the optimizer state
    return dict(step_s=statistics.median(times), loss_last=round(losses[-1].float().item(), 4),
                ran="FSDP2 (velotune.training.fsdp.shard)" if world > 1 else "one GPU, unsharded",
                path=decision.reason, **peak(cuda))


def run_peer(args, cuda: bool, world: int, rank: int, local_rank: int, amp: bool = False) -> dict:
    """transformers' LlamaForCausalLM under plain transformers.Trainer with its own FSDP2 switch. `amp`:
    bf16=True, accelerate's mixed precision (it keeps fp32 master weights for FSDP2 and autocasts)."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = build(LlamaForCausalLM, llama_config(args.shape), device, cuda)
    steps = args.warmup + args.steps
    gen = batches(args, model.config.vocab_size, rank, "cpu")
    rows = [{"input_ids": ids[0], "labels": ids[0]} for ids in (next(gen)[:1] for _ in range(steps * args.batch
                                                                                                * args.accum))]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.start)
            if state.global_step == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()

    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                        "reshard_after_forward": True}) if world > 1 else {}
    # Without amp: bf16 weights trained as they are (no fp32 master copy), as velotune's run.
    targs = TrainingArguments(output_dir=args.scratch, per_device_train_batch_size=args.batch,
                              gradient_accumulation_steps=args.accum, max_steps=steps, learning_rate=1e-5,
                              optim="adamw_torch", bf16=amp and cuda, fp16=False, gradient_checkpointing=True,
                              save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
                              dataloader_pin_memory=False, use_cpu=not cuda, seed=0, **fsdp)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return dict(step_s=statistics.median(times), loss_last=round(losses[-1], 4) if losses else None,
                ran=f"transformers.Trainer, accelerate {trainer.accelerator.distributed_type}", **peak(cuda))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    for engine in args.engines.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if engine == "velotune":
                mine = dict(rank=rank, **run_velotune(args, cuda, world, rank, local_rank))
            else:
                mine = dict(rank=rank, **run_peer(args, cuda, world, rank, local_rank, amp=engine == "peer-amp"))
        except torch.OutOfMemoryError as error:  # "does it fit on one GPU": a no is a result
            mine = dict(rank=rank, oom=str(error).splitlines()[0], step_s=None, **peak(cuda))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            fits = all(r["step_s"] is not None for r in gathered)
            step_s = max(r["step_s"] for r in gathered) if fits else None
            tokens = world * args.batch * args.seq * args.accum
            record = dict(engine=engine, nproc=world, shape=args.shape, seq=args.seq,
                          batch=args.batch, accum=args.accum, fits=fits, ran=gathered[0].get("ran"),
                          tokens_per_s=round(tokens / step_s, 1) if fits else None,
                          step_s=round(step_s, 4) if fits else None, oom=gathered[0].get("oom"),
                          per_gpu=[{k: r.get(k) for k in ("rank", "peak_gib", "reserved_gib", "loss_last")}
                                   for r in gathered],
                          device=torch.cuda.get_device_name() if cuda else "cpu")
            print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def launch(args, engine: str, nproc: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--engines", engine, *args.passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {engine} run on {nproc} process(es) failed (exit code {done.returncode})")
    return [json.loads(line[len("RESULT "):]) for line in lines]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["llama8b", "llama1b", "tiny"], default="llama8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="per GPU")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--nprocs", default="1,2", help="process counts to run in turn, one torchrun each")
    parser.add_argument("--engines", default="velotune,peer")
    parser.add_argument("--scratch", default="/tmp/bench_fsdp", help="the peer Trainer's output_dir (nothing saved)")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, 2 CPU processes (gloo), one launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shape, args.seq, args.batch, args.accum, args.steps, args.warmup = "tiny", 32, 1, 2, 2, 1
        args.nprocs = "2"
    if args.worker:
        return worker(args)
    raw = list(sys.argv[1:] if argv is None else argv)
    skip = {"--nprocs", "--json", "--engines"}
    args.passthrough = [a for i, a in enumerate(raw) if a not in skip and not (i and raw[i - 1] in skip)]
    records = []
    for nproc in (int(n) for n in args.nprocs.split(",")):
        if args.dry_run:  # one launch runs both engines (the script is checked, not measured)
            records += launch(args, args.engines, nproc)
        else:
            for engine in args.engines.split(","):
                records += launch(args, engine, nproc)
    for r in records:
        gpus = ", ".join(f"{g['peak_gib']}/{g['reserved_gib']}" for g in r["per_gpu"])
        speed = f"{r['tokens_per_s']:,.0f} tokens/s" if r["fits"] else f"does not fit ({r['oom']})"
        print(f"{r['engine']} on {r['nproc']} process(es) [{r['ran']}]: {speed}; peak/reserved GiB per GPU: {gpus}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
