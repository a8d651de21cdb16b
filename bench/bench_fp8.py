"""FP8 compute (issue 18): training speed beside the peers, and FP8 vs 16-bit convergence.

`speed` runs the loop of the peers' harness (.bench/peer_bench.py `run`: random ids, AdamW fused,
median step of `--steps` after `--warmup`, peak allocated memory) on velotune with a precision
mode the harness cannot pass (it only knows load_in_4bit), one mode per process:
  bf16      load_in_4bit=False                16-bit LoRA
  nf4       load_in_4bit=True                 QLoRA
  fp8       load_in_fp8=True                  FP8 storage, FP8 GEMMs
  nf4-fp8   load_in_4bit=True, fp8_compute    NF4 storage, FP8 GEMMs
  python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode fp8 --seq 2048 --bs 2 --ga 4

`converge` trains LoRA for `--steps` steps on real text (the .py files of Python's standard
library, present on every machine: held-out = every 10th file) with each mode from the same
start, data and seed, and writes the loss curves and held-out losses as JSON (and a PNG when
matplotlib is there). `--model llama1b` builds a Llama-3.2-1B-shaped model (random weights, as
the peers' harness does) with a BPE tokenizer trained on the corpus; `--model PATH` loads a real
checkpoint (e.g. SmolLM2) with its tokenizer.
  python bench/bench_fp8.py converge --model llama1b --modes bf16,fp8 --steps 200 --out $OUT/fp8_converge

`kernels` times the pieces of one projection's FP8 GEMMs at Llama-8B shapes (GPU only), after
`conversions`: each conversion kernel's GPU time and achieved GB/s (bench/fp8_conversions.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

MODES = {
    "bf16": dict(load_in_4bit=False),
    "nf4": dict(load_in_4bit=True),
    "fp8": dict(load_in_4bit=False, load_in_fp8=True),
    "nf4-fp8": dict(load_in_4bit=True, fp8_compute=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ~0.9M and 0.12M tokens: 200 steps of 4 x 512 see each training token about once
TRAIN_CHARS, HELD_CHARS = 3_000_000, 400_000
LLAMA1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load(model_path: str, mode: str, seq: int, rank: int, checkpointing="unsloth"):
    """`checkpointing`: get_peft_model's use_gradient_checkpointing, or "torch": True through torch's non-reentrant
    checkpoint (RuntimeSettings.torch_checkpoint; what True ran before session 12), for the same-run comparison."""
    import torch

    from velotune import FastLanguageModel
    from velotune.fast.plan import runtime_settings, set_fast_path, set_fp8_compute

    options = MODES[mode]
    on_cpu = DEVICE == "cpu"
    if on_cpu:  # from_pretrained keeps FP8 off the CPU (a notice, 16-bit): FP8 storage is made here instead
        options = {k: v for k, v in options.items() if k not in ("load_in_fp8", "fp8_compute")}
    model, tok = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=seq, dtype=torch.bfloat16,
                                                   **options)
    if on_cpu and MODES[mode].get("load_in_fp8"):
        from velotune.quant.fp8 import quantize_model_fp8_

        quantize_model_fp8_(model)
    model = FastLanguageModel.get_peft_model(
        model, r=rank, lora_alpha=rank, lora_dropout=0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing=True if checkpointing == "torch" else checkpointing, random_state=3407,
        max_seq_length=seq)
    runtime_settings(model).torch_checkpoint = checkpointing == "torch"
    if on_cpu:
        # The CPU runs the GPU's FP8 numerics (fast/fp8_matmul.py: the same e4m3 rounding and row scales, the GEMM
        # as the fp32 product of the dequantized operands) on the fast path, forced as the tests force it; every
        # mode takes the fast path so the comparison differs in the GEMMs alone.
        set_fast_path(model, True)
        set_fp8_compute(model, bool(MODES[mode].get("load_in_fp8") or MODES[mode].get("fp8_compute")))
    return model, tok


@contextlib.contextmanager
def _kernel_profile(enabled: bool, mode: str):
    """torch.profiler over the block when `enabled`: its top CUDA kernels by self time, and the FP8 pieces
    (quantization, transposes, scaled GEMMs) summed, so the step's FP8 overheads read beside its GEMMs."""
    import torch

    if not enabled:
        yield
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"PROFILE {mode}: one micro-batch, by self CUDA time\n" + table.table(sort_by="self_cuda_time_total",
                                                                                 row_limit=30), flush=True)
    groups: dict[str, float] = {}
    names: dict[str, list[tuple[float, str]]] = {}
    # Kernel events only: an operator's self device time is its kernels' time again (session 11's groups counted
    # cuBLAS's FP8 kernels under "bf16 gemm" and aten::_scaled_mm's share under "fp8 gemm", summing to ~2x the step)
    for e in table:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lower()
        kind = next((k for k, words in PROFILE_GROUPS.items() if any(w in name for w in words)), "other")
        ms = getattr(e, "self_device_time_total", 0.0) / 1e3
        groups[kind] = groups.get(kind, 0.0) + ms
        names.setdefault(kind, []).append((ms, e.key[:90]))
    print("PROFILE kernel groups (ms): " + json.dumps({k: round(v, 2) for k, v in sorted(groups.items())})
          + f", all kernels {sum(groups.values()):.1f} ms", flush=True)
    for kind, rows in sorted(names.items()):  # which kernels each group holds, so a misfiled name shows
        top = ", ".join(f"{n} {ms:.1f}" for ms, n in sorted(rows, reverse=True)[:4])
        print(f"PROFILE {kind}: {top}", flush=True)


# Kernel-name fragments -> what they are, for the profile's sums (lower case).
PROFILE_GROUPS = {
    "fp8 gemm": ("f8", "fp8_gemm", "scaled_mm", "e4m3"),
    "fp8 quantize": ("quantize_rows", "_quantize"),
    "fp8/nf4 transpose": ("transpose", "_t_kernel", "nf4_fp8"),
    "nf4 -> fp8 (row-major)": ("nf4_to_fp8",),  # after the transposes: _nf4_to_fp8_t_kernel is one of those
    "bf16 gemm": ("nvjet", "gemm", "cutlass", "sm90_xmma"),
    "attention": ("flash", "sdpa", "fmha", "attention"),
}


def speed(args) -> None:
    import torch
    from bench_train import memory_record  # the graphs' pool counted (bench/ is the script's path)

    torch.cuda.reset_peak_memory_stats()
    if args.max_graphed_elements is not None:  # plan.py's bound on CUDA-graphed layers (8B layers are above it)
        from velotune.fast import plan

        plan.MAX_GRAPHED_ELEMENTS = plan.MAX_GRAPHED_ELEMENTS_FP8 = args.max_graphed_elements
    t0 = time.time()
    model, _ = load(model_folder(args.model), args.mode, args.seq, args.rank, checkpointing=args.checkpointing)
    load_s = time.time() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    n = args.bs * args.seq
    times, losses, waits = [], [], []  # waits: seconds a step's host spent blocked on the GPU (near 0: host-bound)
    torch.cuda.reset_peak_memory_stats()
    mem_after_load = torch.cuda.memory_allocated()
    peak_with_warmup = 0
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        if step == args.warmup:  # CUDA graphs are captured by now: later steps allocate outside their pool
            peak_with_warmup = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t, wait = time.time(), 0.0
        for micro in range(args.ga):
            ids = torch.randint(4, min(vocab, 32000), (args.bs, args.seq), device="cuda", generator=g)
            last = args.profile and step == args.warmup + args.steps - 1 and micro == args.ga - 1
            with _kernel_profile(last, args.mode):  # one micro-batch of the last step (its time is not used)
                out = model(input_ids=ids, labels=ids)
                (out.loss / args.ga).backward()
            w = time.time()
            losses.append(float(out.loss.detach()))
            wait += time.time() - w
        opt.step()
        opt.zero_grad(set_to_none=True)
        w = time.time()
        torch.cuda.synchronize()
        if step >= args.warmup and not args.profile:
            times.append(time.time() - t)
            waits.append(wait + time.time() - w)
    if args.profile:
        return
    times.sort()
    med = times[len(times) // 2]
    res = dict(stack="velotune", quant=args.mode, seq=args.seq, bs=args.bs, ga=args.ga, rank=args.rank,
               tokens_per_s=round(n * args.ga / med, 1), step_s=round(med, 4),
               gpu_wait_s=round(sorted(waits)[len(waits) // 2], 4), max_graphed_elements=args.max_graphed_elements,
               **memory_record(peak_with_warmup, torch.cuda.max_memory_allocated()),
               load_gib=round(mem_after_load / 2**30, 2), load_s=round(load_s, 1),
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
               trainable=sum(p.numel() for p in params))
    print("RESULT " + json.dumps(res), flush=True)


def corpus() -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): the standard library's .py files, every 10th held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return (_capped([t for i, t in enumerate(texts) if i % 10], TRAIN_CHARS),
            _capped([t for i, t in enumerate(texts) if i % 10 == 0], HELD_CHARS))


def _capped(texts: list[str], chars: int) -> list[str]:
    """The first texts up to `chars` characters (tokenizing all 30 MB would cost a minute)."""
    kept, total = [], 0
    for t in texts:
        if total >= chars:
            break
        kept.append(t)
        total += len(t)
    return kept


def make_llama1b(folder: Path, train: list[str], shape: dict) -> None:
    """A Llama-3.2-1B-shaped checkpoint (random bf16 weights) with a 16K BPE tokenizer trained on `train`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tk.train_from_iterator(train, trainers.BpeTrainer(vocab_size=16384, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=16384, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, **shape)
    with torch.device(DEVICE):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def model_folder(model: str, train: list[str] | None = None) -> str:
    """`model` as a folder: "llama1b" / "tiny" (a CPU dry run) are built once under /tmp (random
    weights, a tokenizer trained on `train`, by default the corpus' training texts)."""
    if model not in ("llama1b", "tiny"):
        return model
    folder = Path(f"/tmp/fp8_{model}")
    if not (folder / "config.json").is_file():
        make_llama1b(folder, corpus()[0] if train is None else train, LLAMA1B if model == "llama1b" else TINY)
    return str(folder)


def blocks(tok, texts: list[str], seq: int):
    """The texts tokenized, joined with EOS and cut into (n, seq) rows."""
    import torch

    ids = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:  # one batched call: Rust threads
        ids.extend(row)
        ids.append(tok.eos_token_id)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def converge(args) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = corpus()
    model_path = model_folder(args.model, train)
    results = {"model": args.model, "steps": args.steps, "bs": args.bs, "seq": args.seq, "lr": args.lr,
               "rank": args.rank, "corpus": "Python stdlib .py files (every 10th held out)", "modes": {}}
    data = held_data = None
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        t0 = time.time()
        model, tok = load(model_path, mode, args.seq, args.rank, checkpointing=True)
        if data is None:
            data, held_data = blocks(tok, train, args.seq), blocks(tok, held, args.seq)[: args.held_rows]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(data.shape[0], generator=gen)
        curve = []
        model.train()
        for step in range(args.steps):
            rows = order[(step * args.bs) % len(order):][: args.bs]
            ids = data[rows].to(DEVICE)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            lr_now = args.lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr_now
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(round(float(loss.detach()), 5))
        model.eval()
        with torch.no_grad():
            held_losses = [float(model(input_ids=held_data[i:i + args.bs].to(DEVICE),
                                       labels=held_data[i:i + args.bs].to(DEVICE)).loss)
                           for i in range(0, held_data.shape[0], args.bs)]
        results["modes"][mode] = dict(curve=curve, held_out_loss=round(sum(held_losses) / len(held_losses), 5),
                                      seconds=round(time.time() - t0, 1))
        print(f"{mode}: first {curve[0]:.4f} last10 {sum(curve[-10:]) / 10:.4f} held-out "
              f"{results['modes'][mode]['held_out_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        del model, opt, params
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    base = results["modes"].get("bf16")
    for mode, r in results["modes"].items():
        ref = base if mode != "nf4-fp8" else results["modes"].get("nf4", base)
        if ref is not None and ref is not r:
            r["held_out_rel_diff"] = round(r["held_out_loss"] / ref["held_out_loss"] - 1, 5)
    (out / "converge.json").write_text(json.dumps(results, indent=1))
    summary = {m: {k: v for k, v in r.items() if k != "curve"} for m, r in results["modes"].items()}
    print("RESULT " + json.dumps(summary))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the JSON has the curves)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, r in results["modes"].items():
        ax.plot(r["curve"], label=f"{mode} (held-out {r['held_out_loss']:.3f})", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"velotune LoRA r={args.rank}, {args.model}: FP8 vs 16-bit GEMMs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "converge.png", dpi=120)


def kernels(args) -> None:
    """Per-piece GPU times at Llama-8B shapes (M = 4096 tokens): the FP8 GEMMs of one projection
    (forward and backward) beside bf16's, and what they add (row quantization, NF4 -> e4m3, the
    backward's transposed copy) beside NF4 -> bf16, so a missed speed target can be located.
    The backward's (in, out) copy is timed both ways: PyTorch's `.t().contiguous()` (the old path,
    `*_old_ms`) and our kernels (tiled transpose of the e4m3 weight; NF4 written transposed), with a
    few tiles beside the defaults (`transpose_tiles_ms`, `nf4_t_tiles_ms`: "BLOCK_RxBLOCK_C/warps"), and the
    wider activation's row quantization one-pass vs two-pass (`quant_wide_ms`)."""
    from velotune.fast.fp8_matmul import _ones, _scaled_mm, fp8_grad_input, fp8_linear, quantize_input
    from velotune.fast.lora_linear import LoraProjection
    from velotune.kernels import dequantize_nf4_to_fp8, dequantize_nf4_weight, quantize_fp8_rows
    from velotune.kernels.fp8_transpose import DEFAULT_TILE, transpose_bytes
    from velotune.quant.fp8 import quantize_weight_fp8
    from velotune.quant.linear import to_linear4bit

    from fp8_conversions import wall_ms as ms  # Python calls back to back, host launch cost included

    def old_bwd(g, values_t_fn, scale):  # fp8_grad_input as it was: the weight's transposed copy by PyTorch
        values_t = values_t_fn()  # (in, out) row-major
        g8, g_scale = quantize_fp8_rows(g, col_scale=scale)
        return _scaled_mm(g8, values_t.t(), g_scale, _ones(values_t.shape[0], g.device))

    def nf4_tiles(weight, ms) -> dict:
        """NF4 -> transposed e4m3 with other tiles than nf4_fp8_transposed.TILE (the weight's cached launch
        is dropped before and after each, so the next call plans it again with the tile in force)."""
        from velotune.kernels import nf4_fp8, nf4_fp8_transposed

        default, times = nf4_fp8_transposed.TILE, {}
        entry = nf4_fp8._CACHE[id(weight.quant_state)]
        expected = dequantize_nf4_to_fp8(weight)[0].t().contiguous().view(torch.uint8)
        for tile in [(64, 128, 4), (32, 128, 4), (64, 64, 4), (128, 128, 8), (64, 256, 8)]:
            nf4_fp8_transposed.TILE, entry.launch_t = tile, None
            name = "{}x{}/{}".format(*tile)
            times[name] = round(ms(lambda: dequantize_nf4_to_fp8(weight, transposed=True)), 4)
            if not torch.equal(dequantize_nf4_to_fp8(weight, transposed=True)[0].view(torch.uint8), expected):
                times[name] = "DIFFERS"
        nf4_fp8_transposed.TILE, entry.launch_t = default, None
        return times

    def quant_wide(t, col, ms) -> dict:
        """The row quantization of the wider activation (x of down_proj, dY of gate/up) with one pass in
        registers (the default up to fp8._ONE_PASS_COLS; at 14336 columns its 16-warp program holds 74
        registers a thread, one program an SM by the sm_90 build) beside the two-pass loop, a few blocks."""
        from velotune.kernels import fp8 as fp8_kernels

        one_pass, loop_block, times = fp8_kernels._ONE_PASS_COLS, fp8_kernels._LOOP_BLOCK, {}
        expected = quantize_fp8_rows(t, col)[0].view(torch.uint8)
        default = "one_pass" if t.shape[1] <= one_pass else f"two_pass_{loop_block}"
        times[default] = round(ms(lambda: quantize_fp8_rows(t, col)), 4)
        for block in (1024, 2048, 4096):
            fp8_kernels._ONE_PASS_COLS, fp8_kernels._LOOP_BLOCK = block, block
            name = f"two_pass_{block}"
            times[name] = round(ms(lambda: quantize_fp8_rows(t, col)), 4)
            if not torch.equal(quantize_fp8_rows(t, col)[0].view(torch.uint8), expected):
                times[name] = "DIFFERS"
        fp8_kernels._ONE_PASS_COLS, fp8_kernels._LOOP_BLOCK = one_pass, loop_block
        return times

    from fp8_conversions import conversion_rows

    conversion_rows()
    rows = []
    m = 4096
    tiles = [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8)]
    for out_f, in_f in [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
        values, scale = quantize_weight_fp8(w)
        p = LoraProjection(values, None, None, None, 0.0, scale, fp8=True)
        x8, sx = quantize_input(x)
        nf4 = to_linear4bit(torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)).weight
        p_nf4 = LoraProjection(nf4, None, None, None, 0.0, None, fp8=True)
        nf4_scale = dequantize_nf4_to_fp8(nf4)[1]
        flops = 2 * m * out_f * in_f
        row = dict(shape=f"{out_f}x{in_f}", m=m,
                   bf16_fwd_ms=ms(lambda: x @ w.t()), bf16_bwd_ms=ms(lambda: g @ w),
                   fp8_fwd_gemm_ms=ms(lambda: fp8_linear(x8, sx, p, torch.bfloat16)),
                   fp8_fwd_with_quant_ms=ms(lambda: fp8_linear(*quantize_input(x), p, torch.bfloat16)),
                   fp8_bwd_ms=ms(lambda: fp8_grad_input(g, p, torch.bfloat16)),
                   fp8_bwd_old_ms=ms(lambda: old_bwd(g, lambda: values.t().contiguous(), scale)),
                   nf4_fp8_bwd_ms=ms(lambda: fp8_grad_input(g, p_nf4, torch.bfloat16)),
                   nf4_fp8_bwd_old_ms=ms(lambda: old_bwd(g, lambda: dequantize_nf4_to_fp8(nf4)[0].t().contiguous(),
                                                         nf4_scale)),
                   quant_x_ms=ms(lambda: quantize_fp8_rows(x)), quant_g_ms=ms(lambda: quantize_fp8_rows(g, scale)),
                   transpose_w8_old_ms=ms(lambda: values.t().contiguous()),
                   transpose_w8_ms=ms(lambda: transpose_bytes(values)),
                   transpose_tiles_ms={f"{r}x{c}/{wp}": round(ms(lambda: transpose_bytes(values, tile=(r, c, wp))), 4)
                                       for r, c, wp in tiles},
                   nf4_to_bf16_ms=ms(lambda: dequantize_nf4_weight(nf4)),
                   nf4_to_fp8_ms=ms(lambda: dequantize_nf4_to_fp8(nf4)),
                   nf4_to_fp8_t_old_ms=ms(lambda: dequantize_nf4_to_fp8(nf4)[0].t().contiguous()),
                   nf4_to_fp8_t_ms=ms(lambda: dequantize_nf4_to_fp8(nf4, transposed=True)),
                   nf4_t_tiles_ms=nf4_tiles(nf4, ms),
                   quant_wide_ms=quant_wide(x if in_f > out_f else g, None if in_f > out_f else scale, ms))
        same = torch.equal(transpose_bytes(values).view(torch.uint8), values.t().contiguous().view(torch.uint8))
        same &= torch.equal(dequantize_nf4_to_fp8(nf4, transposed=True)[0].view(torch.uint8),
                            dequantize_nf4_to_fp8(nf4)[0].t().contiguous().view(torch.uint8))
        row["transposes_bit_identical"] = bool(same)
        row["default_tile"] = "{}x{}/{}".format(*DEFAULT_TILE)
        row["transpose_w8_tb_s"] = round(2 * out_f * in_f / row["transpose_w8_ms"] / 1e9, 2)  # read + write
        row["bf16_fwd_tflops"] = round(flops / row["bf16_fwd_ms"] / 1e9)
        row["fp8_fwd_gemm_tflops"] = round(flops / row["fp8_fwd_gemm_ms"] / 1e9)
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        print("RESULT " + json.dumps(rows[-1]), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["speed", "converge", "kernels", "conversions"])
    ap.add_argument("--model", default="")
    ap.add_argument("--mode", choices=sorted(MODES), default="fp8")
    ap.add_argument("--modes", default="bf16,fp8,nf4,nf4-fp8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="speed: profile one micro-batch of the last step (kernel "
                    "table + FP8 pieces summed) instead of timing")
    ap.add_argument("--checkpointing", default="unsloth", choices=["unsloth", "true", "false", "torch"],
                    help="speed: use_gradient_checkpointing (unsloth: layer inputs offloaded to pinned host memory; "
                    "torch: True through torch's checkpoint, as before session 12)")
    ap.add_argument("--max-graphed-elements", type=int, default=None,
                    help="speed: plan.MAX_GRAPHED_ELEMENTS and MAX_GRAPHED_ELEMENTS_FP8 for this run (tokens x "
                         "hidden up to which layers are CUDA-graphed; an 8B layer at 4,096 tokens is 16.8M, graphed "
                         "by default with FP8 only; 0: no graphs)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--held-rows", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args(argv)
    args.checkpointing = {"true": True, "false": False}.get(args.checkpointing, args.checkpointing)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if args.cmd == "conversions":
        from fp8_conversions import conversion_rows

        conversion_rows()
        return
    {"speed": speed, "converge": converge, "kernels": kernels}[args.cmd](args)


if __name__ == "__main__":
    main()
