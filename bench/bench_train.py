"""LoRA / QLoRA training-step benchmark of velotune's fast path against its own plain path.

Llama-3.1-8B, Llama-3.2-1B or Llama-3.1-70B shapes with random weights (NF4: made and quantized one
decoder layer at a time, see build_nf4_per_layer, so 70B QLoRA runs on one GPU), random tokens,
LoRA r=32 on every linear projection, fused AdamW; tokens/s (median step time after warm-up) and peak GPU memory. Each
path runs in its own process (a clean allocator and peak counter), `--path both` runs the two
and prints their ratio.

  PYTHONPATH=src python bench/bench_train.py --shape llama8b --quant nf4 --seq 2048 --batch 2 --accum 4
  PYTHONPATH=src python bench/bench_train.py --shape llama1b --quant none --checkpointing false
  PYTHONPATH=src python bench/bench_train.py --shape llama70b --quant nf4 --seq 2048 --batch 1 --accum 4 --path fast
  PYTHONPATH=src python bench/bench_train.py --dry-run          # tiny shape on the CPU, 2 steps
  PYTHONPATH=src python bench/bench_train.py --model /tmp/m_llama8b   # a checkpoint, loaded as users load it

Offload threshold (fast/checkpointing.py OFFLOAD_MIN_TOKENS): compare `--checkpointing unsloth
--offload-min-tokens 0` (always offload) with `--checkpointing true` at several --seq; offloading
pays from the length where its tokens/s loss is small next to its memory saving.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256),
    "llama70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256),  # Llama-3.1-70B
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


def build(args, device: str):
    """Our Llama of the chosen shape, random init (or the checkpoint at --model, loaded as a user
    loads it), LoRA r=32 on every projection."""
    import torch
    from transformers import LlamaConfig

    from velotune import FastLanguageModel
    from velotune.models.families import LlamaForCausalLM
    from velotune.models.rope import RotaryEmbedding
    if args.model:
        model, _ = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                     load_in_4bit=args.quant == "nf4",
                                                     load_in_8bit=args.quant == "int8", device_map=device)
        return _with_adapters(model, args)

    config = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}, **SHAPES[args.shape])  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.quant == "nf4":
        return _with_adapters(build_nf4_per_layer(LlamaForCausalLM, config, device, dtype), args)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # weights made in bf16 directly: no fp32 copy of 8B
    torch.set_default_dtype(default)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()  # inverse frequencies in fp32, as loading leaves them
    if args.quant == "int8":  # bitsandbytes LLM.int8 layers, as load_in_8bit=True builds them (plain path only)
        from velotune.quant.int8 import quantize_model_int8_

        quantize_model_int8_(model)
    return _with_adapters(model, args)


def build_nf4_per_layer(cls, config, device: str, dtype):
    """`cls(config)` with random NF4 decoder layers, made one layer at a time and quantized as it is made.

    The 16-bit model never exists whole, on the GPU or in host memory: the Llama-3.1-70B shape is 141 GB
    in bf16 (more than one H200 holds, and a 140 GB random-weight folder would not fit the 1-GPU
    machine's 64 GiB disk). The architecture is built on the meta device; the embeddings, final norm and
    lm_head (kept 16-bit, as loading keeps lm_head) are made on `device`, then each decoder layer in
    turn: its 16-bit weights are drawn (the model's own `_init_weights`, as post_init draws them),
    quantized to NF4, and dropped. Peak: the NF4 model plus one 16-bit layer (70B: ~1.7 GB)."""
    import torch

    from velotune.models.rope import RotaryEmbedding
    from velotune.quant import quantize_model_

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta tensors take this dtype; to_empty keeps it
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    decoder = model.model
    for part in [decoder.embed_tokens, decoder.norm] + ([] if config.tie_word_embeddings else [model.lm_head]):
        part.to_empty(device=device)
        part.apply(model._init_weights)
    for layer in decoder.layers:
        layer.to_empty(device=device)
        layer.apply(model._init_weights)
        quantize_model_(layer, compute_dtype=dtype)  # its 7 projections become NF4 before the next layer is made
    if config.tie_word_embeddings:
        model.lm_head.weight = decoder.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()  # a meta buffer until now; fp32 inverse frequencies, as loading leaves them
            module.to(device)  # reset_frequencies makes a meta buffer on the CPU; the layers' device
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"build_nf4_per_layer left {still_meta[:3]} on the meta device: a module of "
                           f"{cls.__name__} outside embed_tokens, norm, lm_head and layers needs making too")
    return model


def _with_adapters(model, args):
    from velotune.lora import get_peft_model

    model = get_peft_model(model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none",
                           target_modules=TARGETS, use_gradient_checkpointing=CHECKPOINTING[args.checkpointing],
                           random_state=3407, max_seq_length=args.seq)
    if args.offload_min_tokens is not None:
        model.get_base_model().model.runtime.offload_min_tokens = args.offload_min_tokens
    return model


def run(args) -> dict:
    import torch

    from velotune.fast.plan import plan_step, set_fast_path

    device = "cpu" if args.dry_run else "cuda"
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build(args, device)
    # On the GPU "fast" is the automatic decision (it must turn on by itself); off it, forced.
    set_fast_path(model, False if args.path == "plain" else (None if cuda else True))
    decision = plan_step(model)
    if (args.path == "fast") != decision.fast:
        raise SystemExit(f"asked for the {args.path} path but the switch says: {decision.reason}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    tokens_per_step = args.batch * args.seq * args.accum
    load_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    est = _estimate(model, args, device)
    if cuda:
        torch.cuda.empty_cache()  # loading's cached blocks are not the step's: reserved starts at allocated
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def train_step() -> None:
        for _ in range(args.accum):
            ids = torch.randint(4, min(vocab, 32000), (args.batch, args.seq), device=device, generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / args.accum).backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    peak_with_warmup = 0
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
            if step == args.warmup:  # CUDA graphs are captured by now: later steps allocate outside their pool
                peak_with_warmup = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    steady_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if args.profile:
        profile_step(train_step, args.profile, cuda)
    return dict(
        path=args.path, shape=args.model or args.shape, quant=args.quant, seq=args.seq, batch=args.batch,
        accum=args.accum, rank=args.rank, checkpointing=args.checkpointing, offload_min_tokens=args.offload_min_tokens,
        tokens_per_s=round(tokens_per_step / step_s, 1), step_s=round(step_s, 4),
        **(memory_record(peak_with_warmup, steady_peak) if cuda else {"peak_gib": None}),
        load_gib=round(load_gib, 2) if cuda else None, estimate_gib=round(est.total / 2**30, 2),
        estimate_host_gib=round(est.host / 2**30, 2), loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4), trainable=sum(p.numel() for p in params), reason=decision.reason,
        device=torch.cuda.get_device_name() if cuda else "cpu",
    )


def _estimate(model, args, device: str):
    """velotune's memory estimate of this step, as the trainer computes it before training (bench's optimizer:
    torch AdamW, whose moments take the adapters' fp32)."""
    import torch

    from velotune.training.memory import estimate

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return estimate(model, args.batch, args.seq, "adamw_torch", dtype, checkpointing=args.checkpointing != "false",
                    device=device)


def memory_record(peak_with_warmup: int, steady: int) -> dict:
    """Peak GPU memory, in GiB. `peak_gib`: the largest allocation of the whole run, the figure the
    peers' harness reports (max_memory_allocated). With CUDA graphs that figure misses the graphs'
    private memory pool, which stays reserved and which replays use without the allocator seeing
    it, so `peak_with_graphs_gib` adds the pool's size to the measured steps' own peak: the memory
    the process needs at its peak (an upper bound: the pool counted whole)."""
    import torch

    segments = torch.cuda.memory_snapshot()
    if any("segment_pool_id" not in s for s in segments):
        raise SystemExit("this torch's memory_snapshot() does not say which pool a segment belongs to")
    pool = sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) != (0, 0))
    gib = 2**30
    return dict(peak_gib=round(max(peak_with_warmup, steady) / gib, 2), graph_pool_gib=round(pool / gib, 2),
                peak_with_graphs_gib=round((steady + pool) / gib, 2),
                reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2))


def profile_step(train_step, trace_path: str, cuda: bool) -> None:
    """One more optimizer step under torch.profiler: the top ops by device time (stderr) and a
    Chrome trace at `trace_path` (where the time of a step goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        train_step()
    averages = prof.key_averages()
    for sort in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(f"-- top ops by {sort}", file=sys.stderr)
        print(averages.table(sort_by=sort, row_limit=25), file=sys.stderr, flush=True)
    prof.export_chrome_trace(trace_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--model", default=None, help="load this checkpoint with FastLanguageModel.from_pretrained "
                        "instead of building --shape with random weights (e.g. the peers' harness model)")
    parser.add_argument("--quant", choices=["nf4", "int8", "none"], default="nf4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--path", choices=["fast", "plain", "both"], default="both")
    parser.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), default="unsloth")
    parser.add_argument("--offload-min-tokens", type=int, default=None,
                        help="override OFFLOAD_MIN_TOKENS (0: offload every layer input)")
    parser.add_argument("--mem-frac", type=float, default=None, help="cap GPU memory (set_per_process_memory_fraction)")
    parser.add_argument("--profile", metavar="TRACE.json", default=None,
                        help="profile one extra step: top ops on stderr, Chrome trace to this path")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU, 2 steps: checks the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shape, args.seq, args.batch, args.accum, args.steps, args.warmup = "tiny", 32, 2, 2, 2, 1
    if args.path == "both":
        results = {}
        for path in ("plain", "fast"):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--path", path]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                raise SystemExit(f"{path} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            print(lines[-1], flush=True)
            results[path] = json.loads(lines[-1][len("RESULT "):])
        speedup = results["fast"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        print(f"fast/plain tokens/s: {speedup:.2f}x; peak GiB fast {results['fast']['peak_gib']} "
              f"vs plain {results['plain']['peak_gib']}", flush=True)
        return
    if args.mem_frac and not args.dry_run:
        import torch

        torch.cuda.set_per_process_memory_fraction(args.mem_frac)
    print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
