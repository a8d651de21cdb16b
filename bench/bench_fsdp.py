"""FSDP2 over the GPUs of one machine: the Llama-3.1-8B and -70B shapes, full fine-tuning and LoRA (issues 19, 21).

Two engines on the same settings (random bf16 weights, AdamW, random tokens, 2K tokens per sequence,
activation checkpointing per decoder layer, bf16 compute, fp32 gradient reduction):

* velotune: our Llama, sharded by `velotune.training.fsdp.shard` (what `SFTTrainer(fsdp=True)` runs:
  `fully_shard` per decoder layer, then the model), stepped by a plain loop. The model is built on the
  meta device, sharded, then made shard by shard (make_velotune), so 70B never exists whole anywhere;
* peer: transformers' own LlamaForCausalLM under plain `transformers.Trainer` with `fsdp=True`,
  `fsdp_config={"version": 2, ...}` (accelerate's FSDP2), the same batch, steps and optimizer, bf16
  weights trained as they are (accelerate's FSDP2 without mixed precision also reduces in bf16);
* peer-amp: the same with `bf16=True`, accelerate's mixed precision (fp32 master weights and optimizer
  state, bf16 autocast): what a transformers user gets by default, at twice the weight memory.

`--mode full`: every weight trains. `--mode lora`: LoRA r=16 on the 7 projections (velotune's
get_peft_model; PEFT's LoraConfig for the peers) over the frozen bf16 base, sharded the same way; the
adapters are fp32 in both (PEFT's default upcast; FSDP2 gathers a unit of mixed dtypes as bytes).
With one process the model is not sharded (does it fit on one GPU at all: an out-of-memory is
recorded as such). One process count, mode and engine per torchrun launch (clean allocators); rank 0
prints a RESULT line; the end prints a table per GPU: tokens/s per GPU, the largest peak, and the
scaling efficiency against the smallest process count that fit (summarize).

One command per table (H200 machines; times are estimates, mostly start-up and model making):
  # 8B full fine-tuning, 1-8 GPUs (x8 kind, ~15 min; on x2: --nprocs 1,2, ~5 min)
  PYTHONPATH=src python bench/bench_fsdp.py --shape llama8b --mode full --nprocs 1,2,4,8 --engines velotune,peer --json fsdp_8b_full.json
  # 8B LoRA r=16, 1-8 GPUs (x8 kind, ~12 min)
  PYTHONPATH=src python bench/bench_fsdp.py --shape llama8b --mode lora --nprocs 1,2,4,8 --engines velotune,peer --json fsdp_8b_lora.json
  # 70B LoRA r=16 (1 GPU: does the 141 GB bf16 base fit; 2-8: sharded), velotune only (x8 kind, ~12 min)
  PYTHONPATH=src python bench/bench_fsdp.py --shape llama70b --mode lora --nprocs 1,2,4,8 --engines velotune --json fsdp_70b_lora.json
  # 70B full fine-tuning: weights + gradients + AdamW state = 564 GB in bf16, so 8 GPUs only (70.6 GB each), and
  # no accumulation: between syncs FSDP2 keeps whole unsharded gradients (141 GB), so 4 x 2K in one micro-batch (x8, ~6 min)
  PYTHONPATH=src python bench/bench_fsdp.py --shape llama70b --mode full --nprocs 8 --batch 4 --accum 1 --engines velotune --json fsdp_70b_full.json
  # beside them, 70B QLoRA on one GPU: bench/bench_train.py --shape llama70b --quant nf4 (its docstring)
  PYTHONPATH=src python bench/bench_fsdp.py --dry-run    # tiny shape, 2 CPU processes (gloo): both modes, both engines
On the CPU (the dry run) accelerate does not turn FSDP on (its CPU launches are DDP): the peer's record
says which engine really ran (`ran`). bench/fsdp_comm.py gives the communication these runs need.
"""

from __future__ import annotations

import argparse
import datetime
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


def make_velotune(args, mode: str, device, cuda: bool, world: int, rank: int):
    """Our Llama built on the meta device, LoRA added (mode lora: r=16 on the 7 projections through
    velotune's get_peft_model, frozen base), sharded per decoder layer (world > 1, the trainer's
    `fsdp.shard`), and only then made: each rank allocates its shards alone, so the 70B shape (141 GB
    in bf16) never exists whole on any GPU or in host memory. Random values drawn on each rank's own
    shard (normal 0.02, norms 1, lora_B 0): a benchmark needs their shapes and a finite loss, not a copy."""
    import torch
    from torch.distributed.tensor import DTensor

    from velotune.lora import get_peft_model
    from velotune.models.families import LlamaForCausalLM
    from velotune.models.rope import RotaryEmbedding
    from velotune.training import fsdp

    sys.path.insert(0, str(HERE))
    from bench_train import TARGETS

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # meta tensors take it; to_empty keeps it
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(args.shape))
    finally:
        torch.set_default_dtype(default)
    if mode == "lora":
        model = get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none", target_modules=TARGETS,
                               use_gradient_checkpointing=True, random_state=3407, max_seq_length=args.seq)
    else:
        model.requires_grad_(True)
        model.gradient_checkpointing_enable()
    if world > 1:
        fsdp.shard(model, fsdp.Sharding(), SimpleNamespace(bf16=cuda, device=device))
    model.to_empty(device=device)
    torch.manual_seed(rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param  # (this rank's rows)
            if "lora_B" in name:
                local.zero_()
            elif param.ndim == 1:
                local.fill_(1.0)  # RMSNorm weights
            else:
                local.normal_(0.0, 0.02)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()  # fp32 inverse frequencies, as loading leaves them
    return model


def run_velotune(args, mode: str, cuda: bool, world: int, rank: int, local_rank: int) -> dict:
    """velotune's model and sharding (the trainer's function) and a plain training loop; times optimizer steps."""
    import torch

    from velotune.fast.plan import plan_step
    from velotune.training.fsdp import defers_reduction

    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = make_velotune(args, mode, device, cuda, world, rank)
    model.train()
    decision = plan_step(model, training=True, grad=True, labels=True, tokens=args.batch * args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    data = batches(args, model.config.vocab_size, rank, device)
    times, losses = [], []
    defer = defers_reduction(model)  # as velotune's trainer decides (ShardedModel.no_sync)
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for micro in range(args.accum):
            ids = next(data)
            sync = micro == args.accum - 1 or not defer
            if world > 1:
                model.set_requires_gradient_sync(sync)  # LoRA: reduce-scatter once, in the last micro-batch's backward
            loss = model(input_ids=ids, labels=ids).loss
            (loss / args.accum).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
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
                path=decision.reason, trainable=sum(p.numel() for p in params), **peak(cuda))  # DTensor: global


def run_peer(args, mode: str, cuda: bool, world: int, rank: int, local_rank: int, amp: bool = False) -> dict:
    """transformers' LlamaForCausalLM under plain transformers.Trainer with its own FSDP2 switch. `amp`:
    bf16=True, accelerate's mixed precision (it keeps fp32 master weights for FSDP2 and autocasts).
    Mode lora: PEFT's own LoRA (r=16, the 7 projections) on the frozen model, as a PEFT user writes it.
    The whole bf16 model is built on each GPU before accelerate shards it (8B: 16 GB; 70B: refused in main)."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = build(LlamaForCausalLM, llama_config(args.shape), device, cuda)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        sys.path.insert(0, str(HERE))
        from bench_train import TARGETS

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
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
                              dataloader_pin_memory=False, use_cpu=not cuda, seed=0,
                              gradient_checkpointing_kwargs={"use_reentrant": False}, **fsdp)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return dict(step_s=statistics.median(times), loss_last=round(losses[-1], 4) if losses else None,
                ran=f"transformers.Trainer, accelerate {trainer.accelerator.distributed_type}",
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), **peak(cuda))


def run_one(args, mode: str, engine: str, cuda: bool, world: int, rank: int, local_rank: int) -> dict | None:
    """One engine in one mode on every rank; rank 0 gets the record (the others None)."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        if engine == "velotune":
            mine = dict(rank=rank, **run_velotune(args, mode, cuda, world, rank, local_rank))
        else:
            mine = dict(rank=rank, **run_peer(args, mode, cuda, world, rank, local_rank, amp=engine == "peer-amp"))
    except torch.OutOfMemoryError as error:  # "does it fit on N GPUs": a no is a result
        mine = dict(rank=rank, oom=str(error).splitlines()[0], step_s=None, **peak(cuda))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    fits = all(r["step_s"] is not None for r in gathered)
    step_s = max(r["step_s"] for r in gathered) if fits else None
    tokens = world * args.batch * args.seq * args.accum
    return dict(engine=engine, mode=mode, nproc=world, shape=args.shape, seq=args.seq, batch=args.batch,
                accum=args.accum, fits=fits, ran=gathered[0].get("ran"), trainable=gathered[0].get("trainable"),
                tokens_per_s=round(tokens / step_s, 1) if fits else None,
                step_s=round(step_s, 4) if fits else None, oom=gathered[0].get("oom"),
                per_gpu=[{k: r.get(k) for k in ("rank", "peak_gib", "reserved_gib", "loss_last")} for r in gathered],
                device=torch.cuda.get_device_name() if cuda else "cpu")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A rank out of memory mid-step leaves the others in a collective: bounded, not NCCL's 10 minutes.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    for mode in args.mode.split(","):
        for engine in args.engines.split(","):
            record = run_one(args, mode, engine, cuda, world, rank, local_rank)
            if rank == 0:
                print("RESULT " + json.dumps(record), flush=True)
    dist.barrier()  # every rank done before any tears its group down (a CPU rank once aborted in an unordered teardown)
    dist.destroy_process_group()


def launch(args, engine: str, mode: str, nproc: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--engines", engine, "--mode", mode, *args.passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {engine} {mode} run on {nproc} process(es) failed (exit code {done.returncode})")
    return [json.loads(line[len("RESULT "):]) for line in lines]


def summarize(records: list[dict]) -> list[dict]:
    """Per-GPU figures for each record (in place; returns them): tokens/s per GPU, the largest peak
    over the GPUs, and the scaling efficiency = tokens/s per GPU / that of the smallest process count
    of the same engine, mode and shape that fit (1.0 at that count; None where it did not fit)."""
    for r in records:
        r["tokens_per_s_per_gpu"] = round(r["tokens_per_s"] / r["nproc"], 1) if r["fits"] else None
        peaks = [g["peak_gib"] for g in r["per_gpu"] if g.get("peak_gib") is not None]
        r["peak_gib_max"] = max(peaks) if peaks else None
        fitting = [o for o in records if o["fits"] and (o["engine"], o["mode"], o["shape"]) ==
                   (r["engine"], r["mode"], r["shape"])]
        base = min(fitting, key=lambda o: o["nproc"]) if fitting else None
        r["efficiency_vs_nproc"] = base["nproc"] if base else None
        r["scaling_efficiency"] = (round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3)
                                   if r["fits"] and base else None)
    return records


def table(records: list[dict]) -> str:
    """The records as a markdown table, one row per engine, mode and process count."""
    lines = ["| engine | mode | shape | GPUs | tokens/s | tokens/s per GPU | peak GiB per GPU (max) | scaling eff. |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        eff = f"{r['scaling_efficiency']:.2f} (vs {r['efficiency_vs_nproc']})" if r["scaling_efficiency"] else "-"
        speed = (f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f}" if r["fits"]
                 else f"does not fit | -")
        lines.append(f"| {r['engine']} | {r['mode']} | {r['shape']} | {r['nproc']} | {speed} | {r['peak_gib_max']} | "
                     f"{eff} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from bench_train import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--mode", default="full", help="full, lora, or both as 'full,lora' (one launch each)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="per GPU")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--nprocs", default="1,2", help="process counts to run in turn, one torchrun each (1,2,4,8)")
    parser.add_argument("--engines", default="velotune,peer", help="velotune, peer, peer-amp (comma-separated)")
    parser.add_argument("--scratch", default="/tmp/bench_fsdp", help="the peer Trainer's output_dir (nothing saved)")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, 2 CPU processes (gloo), one launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shape, args.seq, args.batch, args.accum, args.steps, args.warmup = "tiny", 32, 1, 2, 2, 1
        args.nprocs, args.mode = "2", "full,lora"
    modes = args.mode.split(",")
    if any(m not in ("full", "lora") for m in modes):
        parser.error(f"--mode {args.mode!r}: each mode is full or lora")
    if args.worker:
        return worker(args)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if not args.dry_run:
        import torch

        if max(nprocs) > torch.cuda.device_count():
            parser.error(f"--nprocs {args.nprocs}: {max(nprocs)} processes but this machine has "
                         f"{torch.cuda.device_count()} GPU(s); drop the larger counts")
    if args.shape == "llama70b" and any(e.startswith("peer") for e in args.engines.split(",")):
        parser.error("--shape llama70b with a peer engine: the peer builds the whole bf16 model (141 GB) on each GPU "
                     "before accelerate shards it, which no H200 holds; use --engines velotune")
    raw = list(sys.argv[1:] if argv is None else argv)
    skip = {"--nprocs", "--json", "--engines", "--mode"}
    args.passthrough = [a for i, a in enumerate(raw) if a not in skip and not (i and raw[i - 1] in skip)]
    records = []
    for nproc in nprocs:
        if args.dry_run:  # one launch runs every mode and engine (the script is checked, not measured)
            records += launch(args, args.engines, args.mode, nproc)
            continue
        for mode in modes:
            for engine in args.engines.split(","):
                records += launch(args, engine, mode, nproc)
    summarize(records)
    for r in records:
        gpus = ", ".join(f"{g['peak_gib']}/{g['reserved_gib']}" for g in r["per_gpu"])
        speed = f"{r['tokens_per_s']:,.0f} tokens/s" if r["fits"] else f"does not fit ({r['oom']})"
        print(f"{r['engine']} {r['mode']} on {r['nproc']} process(es) [{r['ran']}]: {speed}; "
              f"peak/reserved GiB per GPU: {gpus}")
    print(table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
