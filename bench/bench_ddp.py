"""DDP scaling of velotune's LoRA / QLoRA training step: 1 GPU against N GPUs of one machine (issue 19 item 5).

The step is bench_train.py's (our Llama of the chosen shape with random weights, LoRA r=32 on every
projection, the fast path with the offloading checkpoint and layer graphs as they turn on by
themselves, fused AdamW, random tokens), wrapped in PyTorch's DistributedDataParallel with the
settings velotune's trainer gives it (training/distributed.py): find_unused_parameters=False,
gradient accumulation without all-reduce until the last micro-batch (`no_sync`, as accelerate does).
Each rank builds its own copy on its own GPU from the same seed. One process count per torchrun
launch (clean allocators); the parent runs them in turn and prints tokens/s (all ranks together),
the speed-up over one GPU, and each GPU's peak allocated and reserved memory.

  PYTHONPATH=src python bench/bench_ddp.py --shape llama8b --quant none --seq 2048 --nprocs 1,2
  PYTHONPATH=src python bench/bench_ddp.py --shape llama8b --quant nf4 --seq 2048 --nprocs 1,2
  PYTHONPATH=src python bench/bench_ddp.py --dry-run      # tiny shape, 2 CPU processes (gloo), 2 steps

The peer row (issue 19 item 5, "Unsloth's DDP where it runs"): `--stack unsloth --model FOLDER` loads a
checkpoint folder (the peers' harness makes one: `peer_bench.py make --preset llama8b`) through Unsloth's
FastLanguageModel on each rank's GPU (`device_map={"": local_rank}`), its get_peft_model with the same
LoRA and "unsloth" checkpointing, and runs the same DDP loop; `--stack velotune --model FOLDER` loads the
same folder through velotune's from_pretrained for the row beside it:

  PYTHONPATH=$PWD/src:$PWD/.peers python bench/bench_ddp.py --stack unsloth --model /tmp/m8 --quant nf4 --nprocs 1,2
  PYTHONPATH=$PWD/src:$PWD/.peers python bench/bench_ddp.py --stack velotune --model /tmp/m8 --quant nf4 --nprocs 1,2
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

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    """One rank under torchrun: build, wrap in DDP, time optimizer steps, rank 0 prints the gathered record."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    import bench_train

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(local_rank)  # bench_train builds on "cuda": the current device, this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    build_args = argparse.Namespace(model=args.model, shape="tiny" if args.dry_run else args.shape, quant=args.quant,
                                    seq=args.seq, rank=args.rank, checkpointing=args.checkpointing,
                                    offload_min_tokens=None)
    if args.stack == "unsloth":
        model, reason = unsloth_model(args, local_rank), "Unsloth FastLanguageModel"
    else:
        model = bench_train.build(build_args, "cuda" if cuda else "cpu")
        from velotune.fast.plan import plan_step, set_fast_path

        set_fast_path(model, None if cuda else True)
        reason = plan_step(model).reason
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None,
                                                    find_unused_parameters=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own data
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []

    def micro_batch() -> None:
        ids = torch.randint(4, min(vocab, 32000), (args.batch, args.seq), device=device, generator=gen)
        loss = ddp(input_ids=ids, labels=ids).loss
        (loss / args.accum).backward()
        losses.append(loss.detach())

    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        with ddp.no_sync():  # the all-reduce runs once per optimizer step, in the last micro-batch's backward
            for _ in range(args.accum - 1):
                micro_batch()
        micro_batch()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    gib = 2 ** 30
    mine = dict(rank=rank, step_s=statistics.median(times),
                peak_gib=round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
                reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2) if cuda else None,
                loss_first=round(losses[0].item(), 4), loss_last=round(losses[-1].item(), 4))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        step_s = max(r["step_s"] for r in gathered)  # the step ends when the slowest rank's does
        tokens = world * args.batch * args.seq * args.accum
        record = dict(nproc=world, shape=build_args.shape, quant=args.quant, seq=args.seq, batch=args.batch,
                      accum=args.accum, rank=args.rank, checkpointing=args.checkpointing,
                      tokens_per_s=round(tokens / step_s, 1), step_s=round(step_s, 4),
                      per_gpu=[{k: r[k] for k in ("rank", "peak_gib", "reserved_gib", "loss_last")} for r in gathered],
                      stack=args.stack, reason=reason, device=torch.cuda.get_device_name() if cuda else "cpu")
        print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def unsloth_model(args, local_rank: int):
    """The peer: Unsloth's FastLanguageModel on this rank's GPU, its LoRA as bench_train gives velotune's."""
    import torch
    import unsloth  # noqa: F401  (Unsloth asks to be imported before transformers)
    from unsloth import FastLanguageModel

    from bench_train import TARGETS

    if not args.model:
        raise SystemExit("--stack unsloth needs --model FOLDER (peer_bench.py make --preset llama8b --out FOLDER)")
    model, _ = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.quant == "nf4", device_map={"": local_rank})
    return FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none",
                                            target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                            random_state=3407, max_seq_length=args.seq)


def launch(args, nproc: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", *args.passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    notes = dict.fromkeys(line for line in (done.stdout + done.stderr).splitlines() if "velotune:" in line)
    sys.stderr.write("".join(f"  [{nproc} proc] {line}\n" for line in notes))  # fast-path and graph decisions, once each
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {nproc}-process run failed (exit code {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=["velotune", "unsloth"], default="velotune")
    parser.add_argument("--model", default=None, help="a checkpoint folder to load instead of random weights")
    parser.add_argument("--shape", choices=["llama8b", "llama1b"], default="llama8b")
    parser.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="per GPU")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpointing", choices=["unsloth", "true", "false"], default="unsloth")
    parser.add_argument("--nprocs", default="1,2", help="process counts to run in turn, one torchrun each")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, CPU processes (gloo), 2 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.seq, args.batch, args.accum = 2, 0, 32, 1, 2
    if args.worker:
        return worker(args)
    keep = ("--worker", "--nprocs", "--json")
    raw = list(sys.argv[1:] if argv is None else argv)
    args.passthrough = [a for i, a in enumerate(raw) if a not in keep and not (i and raw[i - 1] in ("--nprocs", "--json"))]
    records = []
    for nproc in (int(n) for n in args.nprocs.split(",")):
        records.append(launch(args, nproc))
        print(json.dumps(records[-1]), flush=True)
    base = next((r for r in records if r["nproc"] == 1), None)
    for r in records:
        if base is not None:
            r["speedup_vs_1"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        gpus = ", ".join(f"{g['peak_gib']}/{g['reserved_gib']}" for g in r["per_gpu"])
        print(f"{r['nproc']} process(es): {r['tokens_per_s']:,.0f} tokens/s"
              + (f", {r['speedup_vs_1']}x one" if base is not None else "") + f"; peak/reserved GiB per GPU: {gpus}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
