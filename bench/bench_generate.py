"""Generation speed of velotune's engine (issue 16): Llama-3.1-8B shape, random weights.

Rows (each prints one `RESULT {json}` line):
  bf16 batch 1 and 16: 128-token prompt, 256 new tokens, greedy, tokens/s (prefill included, as
    the peers' harness `peer_bench.py decode` counts);
  GRPO-shaped: 64 prompts x 8 samples x 512 new tokens, LoRA r=16 on every projection, sampling;
  time to first token of a 4096-token prompt;
  NF4 batch 1 (every projection quantized by velotune.quant), through the fused NF4 GEMV
    (kernels/nf4_gemv_stream.py), (`nf4bnb`) with bitsandbytes' gemv_4bit on the fast path instead, and
    (`nf4plain`) through bitsandbytes' 4-bit GEMV on the plain path;
  `b1old`: bf16 batch 1 with the decode GEMV kernels off (cuBLAS per projection), for comparison;
  `b1nonorm`: bf16 batch 1 with the GEMVs but the pre-norms and residual adds as separate kernels;
  the time of one decode step (graph replay) against the bandwidth bound of its weight bytes,
  and a profile of one eager decode step (top kernels) with `--profile`.

GPU machine:  PYTHONPATH=$PWD/src python bench/bench_generate.py [--preset llama8b|tiny] [--only ...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the tiny preset, to check the script
PRESETS = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}


VOCAB = [32000]  # the prompts' token range, set by build


def build(preset: str):
    from transformers import LlamaConfig

    from velotune.inference import GenerationEngine, InferenceSettings
    from velotune.models import model_class_for

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        torch.manual_seed(0)
        model = model_class_for(cfg)(cfg)
    torch.set_default_dtype(torch.float32)
    model.model.rotary_emb["full_attention"].reset_frequencies()
    VOCAB[0] = cfg.vocab_size
    model.requires_grad_(False)
    model.max_seq_length = 8192
    model.generation_engine = GenerationEngine(InferenceSettings(gpu_memory_utilization=0.9))  # as from_pretrained does
    return model.eval()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, min(32000, VOCAB[0]), (count, length), generator=g).tolist()


def timed(fn, repeat: int = 1):
    fn()  # warm-up: captures the graphs of this batch size
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def decode_row(model, name: str, batch: int, new: int = 256, prompt: int = 128, **sampling):
    from velotune.inference import SamplingParams, generate_batch

    params = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, **({"temperature": 0} | sampling))
    ps = prompts(batch, prompt)
    seconds, out = timed(lambda: generate_batch(model, ps, params), repeat=1 if batch * params.n > 64 else 2)
    count = sum(len(o.token_ids) for r in out for o in r.outputs)
    row = dict(row=name, batch=batch * params.n, prompt=prompt, new=new, tokens=count, s=round(seconds, 3),
               tokens_per_s=round(count / seconds, 1))
    print("RESULT " + json.dumps(row), flush=True)
    return row


def step_time(model, batch: int) -> dict:
    """One decode step as replayed from its graph, and the bandwidth bound of the bytes it must read."""
    from velotune.inference import engine

    resident = engine.resident_of(model)
    graphs = resident.graphs
    graphs.run(batch)
    sync()
    t = time.perf_counter()
    for _ in range(50):
        graphs.run(batch)
    sync()
    ms = (time.perf_counter() - t) / 50 * 1000
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        engine.base_model(model).model.embed_tokens.weight.numel() * 2
    kv = resident.cache.nbytes * batch / resident.cache.rows
    bound_ms = (weights + kv) / 4.3e12 * 1000
    row = dict(row="decode step", batch=batch, ms=round(ms, 3), bound_ms=round(bound_ms, 3),
               weight_gb=round(weights / 1e9, 2), kv_gb=round(kv / 1e9, 3),
               fraction_of_bound=round(bound_ms / ms, 3))
    print("RESULT " + json.dumps(row), flush=True)
    return row


def profile_step(model, batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        return
    from velotune.inference import engine

    resident = engine.resident_of(model)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        resident.graphs._eager(batch)
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)


def ttft(model, length: int = 4096) -> None:
    from velotune.inference import SamplingParams, generate_batch

    ps = prompts(1, length, seed=1)
    seconds, _ = timed(lambda: generate_batch(model, ps, SamplingParams(temperature=0, max_tokens=1)), repeat=3)
    print("RESULT " + json.dumps(dict(row="time to first token", prompt=length, ms=round(seconds * 1000, 1))), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama8b")
    ap.add_argument("--only", default="b1,b1old,b16,step,ttft,grpo,nf4,nf4plain")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--nf4-dense", help="kernels/nf4_gemv.py CONFIG['dense'] as BN,BK,warps,pairs (a sweep's BEST)")
    ap.add_argument("--nf4-glu", help="kernels/nf4_gemv.py CONFIG['glu'], same format")
    ap.add_argument("--bf16-norm", default="8,4096,8", help="b1alt: kernels/gemv.py CONFIG for the launches with the "
                    "fused RMSNorm (q/k/v and gate/up) as BN,BK,warps")
    args = ap.parse_args()
    from velotune.kernels import nf4_gemv

    for key, text in (("dense", args.nf4_dense), ("glu", args.nf4_glu)):
        if text:
            bn, bk, warps, pairs = text.split(",")
            nf4_gemv.CONFIG[key] = (int(bn), int(bk), int(warps), pairs == "True")
    print("nf4 GEMV config:", nf4_gemv.CONFIG, flush=True)
    only = set(args.only.split(","))
    print(torch.__version__, torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", flush=True)
    model = build(args.preset)
    with torch.no_grad():
        if "b1" in only:
            decode_row(model, "bf16 greedy", 1)
            if "step" in only:
                step_time(model, 1)
            if args.profile:
                profile_step(model, 1)
        if "b1alt" in only:  # the norm-fused GEMVs with other launch shapes
            from velotune.inference import release
            from velotune.kernels import gemv as gemv_module

            saved = dict(gemv_module.CONFIG)
            bn, bk, warps = (int(v) for v in args.bf16_norm.split(","))
            gemv_module.CONFIG.update(dense_norm=(bn, bk, warps, False), glu_norm=(bn, bk, warps, False))
            release(model)
            decode_row(model, f"bf16 greedy, norm-fused GEMVs with BN,BK,warps = {args.bf16_norm}", 1)
            if "step" in only:
                step_time(model, 1)
            gemv_module.CONFIG.clear()
            gemv_module.CONFIG.update(saved)
            release(model)
        if "b1nonorm" in only:  # the decode GEMVs without the pre-norms and residual adds fused in
            from velotune.fast import decode_linear
            from velotune.inference import release

            decode_linear.FUSE_NORM = False
            release(model)
            decode_row(model, "bf16 greedy, pre-norms and residual adds as separate kernels", 1)
            if "step" in only:
                step_time(model, 1)
            decode_linear.FUSE_NORM = True
            release(model)
        if "b1old" in only:  # the fast path before the decode GEMV kernels: cuBLAS per projection
            from velotune.fast import plan as plan_module
            from velotune.inference import release

            rows, plan_module.GEMV_ROWS = plan_module.GEMV_ROWS, 0
            release(model)
            decode_row(model, "bf16 greedy, cuBLAS GEMVs (no decode GEMV kernels)", 1)
            if "step" in only:
                step_time(model, 1)
            plan_module.GEMV_ROWS = rows
            release(model)
        if "b16" in only:
            decode_row(model, "bf16 greedy", 16)
            if "step" in only:
                step_time(model, 16)
        if "ttft" in only:
            ttft(model)
    if "grpo" in only:
        from velotune.inference import release
        from velotune.lora import get_peft_model

        release(model)
        peft = get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=False)
        peft.train()  # GRPO generates from the model it trains
        decode_row(peft, "GRPO-shaped bf16 + LoRA r=16", 64, new=512, prompt=128, n=8, temperature=1.0, top_p=1.0)
        release(peft)
        model = peft.unload()
    if "nf4" in only:
        from velotune.quant import quantize_model_

        from velotune.inference import release

        release(model)  # a cache sized for the 4K-token prompt would make every step attend over 4K slots
        quantize_model_(model, skip_modules=("lm_head",), compute_dtype=torch.bfloat16)
        torch.cuda.empty_cache()
        with torch.no_grad():
            decode_row(model, "NF4 greedy", 1)
            if "step" in only:
                step_time(model, 1)
            if args.profile:
                profile_step(model, 1)
            if "nf4bnb" in only:  # bitsandbytes' gemv_4bit at one row instead (the default before 2026-11-30)
                from velotune.fast import decode_linear

                decode_linear.OWN_NF4_GEMV_AT_ONE_ROW = False
                release(model)
                decode_row(model, "NF4 greedy, bitsandbytes gemv_4bit at one row", 1)
                if "step" in only:
                    step_time(model, 1)
                decode_linear.OWN_NF4_GEMV_AT_ONE_ROW = True
                release(model)
            if "nf4plain" in only:  # the plain path: bitsandbytes' own 4-bit GEMV per projection
                from velotune.fast.plan import set_fast_path
                from velotune.inference import release

                release(model)
                set_fast_path(model, False)
                decode_row(model, "NF4 greedy, plain path (bitsandbytes GEMV)", 1)
                if "step" in only:
                    step_time(model, 1)


if __name__ == "__main__":
    main()
