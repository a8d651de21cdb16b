"""Decode GEMV kernels against cuBLAS / bitsandbytes at Llama-3.1-8B layer shapes (issue 16).

For each projection group of one decoder layer (q/k/v in one launch, o, gate/up with the SwiGLU
epilogue, down) at M = 1 (and M = 4), times a sweep of launch shapes (BLOCK_N, BLOCK_K, warps,
[dot]) of kernels/gemv.py (bf16) and kernels/nf4_gemv.py (NF4), and the current paths: cuBLAS
(`x @ W^T` per weight, plus the GLU kernel for gate/up) and, for NF4, bitsandbytes' 4-bit GEMV
(a Linear4bit forward with one token) and dequantize-then-GEMV. Every timing replays a CUDA graph
of 20 calls over rotating weight copies (more bytes than the L2 holds), so launch overhead and
cache hits are out; GB/s = bytes of weights read / time. Prints `RESULT {json}` lines.

`--kinds nf4stream` sweeps kernels/nf4_gemv_stream.py instead (the NF4 GEMV built for bandwidth): its
configs per group beside bitsandbytes' gemv_4bit and kernels/nf4_gemv.py at its default, then the best
config of each group again as the decode path calls it (`fused`: RMSNorm prologue on q/k/v and gate/up,
residual epilogue on o and down); a `STREAM` summary line per group ends the run.

GPU machine:  PYTHONPATH=$PWD/src:$PWD/.peers python bench/bench_gemv.py [--quick]
              PYTHONPATH=$PWD/src:$PWD/.peers python bench/bench_gemv.py --kinds nf4stream   (~2-3 min)
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

H, I, Q, KV = 4096, 14336, 4096, 1024
GROUPS = {  # name -> (output rows of each weight, K, glu)
    "qkv": ((Q, KV, KV), H, False),
    "o": ((H,), Q, False),
    "gate_up": ((I, I), H, True),
    "down": ((H,), I, False),
}
COPIES_BYTES = 400e6  # rotate over this many bytes of weight copies per group (H200 L2: 50 MB)
CALLS = 20


def graph_ms(fn) -> float:
    """Milliseconds per call of fn (no arguments), from a CUDA graph of CALLS calls (best of 5 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / CALLS)
    return best


def rotating(make, nbytes_each: float):
    """A list of weight sets whose total is about COPIES_BYTES, and a function cycling through them."""
    count = max(2, int(COPIES_BYTES // nbytes_each))
    sets = [make() for _ in range(count)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % count
        return sets[state["i"]]

    return sets, next_set


BEST: dict[tuple, tuple] = {}  # (kind, glu) -> (ms summed over the groups, config) of each config


def report(**row) -> None:
    print("RESULT " + json.dumps(row), flush=True)
    if row.get("impl") == "triton" and "ms" in row and "config" in row:
        key = (row["kind"], row.get("group") == "gate_up", tuple(row["config"]))
        BEST[key] = BEST.get(key, 0.0) + row["ms"]


def bench_dense(group: str, M: int, configs) -> None:
    from velotune.kernels import gemv as module
    from velotune.kernels import swiglu

    ns, K, glu = GROUPS[group]
    nbytes = sum(ns) * K * 2
    sets, next_set = rotating(lambda: [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) * 0.02 for n in ns],
                              nbytes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def cublas():
        ws = next_set()
        outs = [x @ w.t() for w in ws]
        return swiglu(*outs) if glu else outs

    ms = graph_ms(cublas)
    report(kind="bf16", group=group, M=M, impl="cublas" + (" + glu kernel" if glu else ""), ms=round(ms, 4),
           gbps=round(nbytes / ms / 1e6, 1))
    activation = "silu" if glu else None
    want = cublas()
    for config in configs:
        module.CONFIG["glu" if glu else "dense"] = config
        try:
            ws = sets[0]
            got = module.gemv(x, ws, activation)
            ref = module.gemv_reference(x, ws, activation)
            err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            ms = graph_ms(lambda: module.gemv(x, next_set(), activation))
        except Exception as error:  # a config the compiler rejects: say so, keep sweeping
            report(kind="bf16", group=group, M=M, config=list(config), error=str(error).splitlines()[0][:200])
            continue
        report(kind="bf16", group=group, M=M, impl="triton", config=list(config), ms=round(ms, 4),
               gbps=round(nbytes / ms / 1e6, 1), max_err=round(err, 4))
    del want


def bench_nf4(group: str, M: int, configs) -> None:
    from velotune.kernels import nf4_gemv as module
    from velotune.kernels import dequantize_nf4_weight, swiglu
    from velotune.quant.linear import to_linear4bit

    ns, K, glu = GROUPS[group]
    nbytes = sum(ns) * K // 2 + sum(ns) * K // 64  # packed bytes + one absmax code per 64 values

    def make():
        layers = []
        for n in ns:
            linear = torch.nn.Linear(K, n, bias=False, device="cuda", dtype=torch.bfloat16)
            layers.append(to_linear4bit(linear, compute_dtype=torch.bfloat16))
        return layers

    sets, next_set = rotating(make, nbytes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    x3 = x[:, None, :]  # (M, 1, K): bitsandbytes' GEMV path takes one token per row of a 3-d input
    activation = "silu" if glu else None

    def dequant():
        outs = [x @ dequantize_nf4_weight(layer.weight).t() for layer in next_set()]
        return swiglu(*outs) if glu else outs

    def bnb():
        outs = [layer(x3) for layer in next_set()]
        return swiglu(*outs) if glu else outs

    for name, fn in (("dequantize + cublas", dequant), ("bitsandbytes gemv_4bit", bnb)):
        if name.startswith("bitsandbytes") and M > 1:
            continue
        try:
            ms = graph_ms(fn)
            report(kind="nf4", group=group, M=M, impl=name, ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1))
        except Exception as error:
            report(kind="nf4", group=group, M=M, impl=name, error=str(error).splitlines()[0][:200])
    for config in configs:
        module.CONFIG["glu" if glu else "dense"] = config
        try:
            layers = sets[0]
            got = module.nf4_gemv(x, [layer.weight for layer in layers], activation)
            ref = module.nf4_gemv_reference(x, [layer.weight for layer in layers], activation)
            err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            ms = graph_ms(lambda: module.nf4_gemv(x, [layer.weight for layer in next_set()], activation))
        except Exception as error:
            report(kind="nf4", group=group, M=M, config=list(config), error=str(error).splitlines()[0][:200])
            continue
        report(kind="nf4", group=group, M=M, impl="triton", config=list(config), ms=round(ms, 4),
               gbps=round(nbytes / ms / 1e6, 1), max_err=round(err, 4))


# kernels/nf4_gemv_stream.py launch shapes swept per group: (BLOCK_N, BLOCK_K, warps, LOOKUP, PREFETCH);
# the first is the module's default (pointer + nibble look-ups, next step prefetched: 64 registers);
# LOOKUP 0 (addresses by OR: fewer instructions, 180 registers); last the 256-entry pair table (the
# first kernel's look-up).
STREAM_CONFIGS = [(8, 1024, 4, 2, True), (16, 1024, 4, 2, True), (8, 2048, 4, 2, True), (8, 512, 4, 2, True),
                  (8, 1024, 8, 2, True), (8, 1024, 4, 2, False), (8, 1024, 4, 0, False), (8, 1024, 4, 0, True),
                  (16, 1024, 4, 0, False), (8, 1024, 4, 1, True)]
STREAM_BEST: dict[str, tuple] = {}  # group -> (GB/s, config) of the best plain launch
BASELINE: dict[str, float] = {}  # group -> gemv_4bit's GB/s


def bench_nf4_stream(group: str, M: int, configs) -> None:
    """kernels/nf4_gemv_stream.py per config, bitsandbytes' gemv_4bit and kernels/nf4_gemv.py (its
    default) on the same rotating weights; then the group's best config with the decode path's fusion."""
    from velotune.kernels import nf4_gemv as first
    from velotune.kernels import nf4_gemv_stream as module
    from velotune.kernels import swiglu
    from velotune.quant.linear import to_linear4bit

    ns, K, glu = GROUPS[group]
    nbytes = sum(ns) * K // 2 + sum(ns) * K // 64  # packed bytes + one absmax code per 64 values

    def make():
        return [to_linear4bit(torch.nn.Linear(K, n, bias=False, device="cuda", dtype=torch.bfloat16),
                              compute_dtype=torch.bfloat16) for n in ns]

    sets, next_set = rotating(make, nbytes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    activation = "silu" if glu else None

    def bnb():
        outs = [layer(x[:, None, :]) for layer in next_set()]  # (M, 1, K): one token per row takes gemv_4bit
        return swiglu(*outs) if glu else outs

    def first_kernel():
        return first.nf4_gemv(x, [layer.weight for layer in next_set()], activation)

    for name, fn in (("bitsandbytes gemv_4bit", bnb), ("kernels/nf4_gemv.py default", first_kernel)):
        if name.startswith("bitsandbytes") and M > 1:
            continue
        try:
            ms = graph_ms(fn)
        except Exception as error:
            report(kind="nf4stream", group=group, M=M, impl=name, error=str(error).splitlines()[0][:200])
            continue
        gbps = nbytes / ms / 1e6
        if name.startswith("bitsandbytes"):
            BASELINE[group] = gbps
        report(kind="nf4stream", group=group, M=M, impl=name, ms=round(ms, 4), gbps=round(gbps, 1))

    saved = dict(module.CONFIG)

    def run(config, fused: bool) -> None:
        module.CONFIG.update({key: config for key in module.CONFIG})
        layers = sets[0]
        norm = residual = None
        if fused and group in ("qkv", "gate_up"):
            norm = (torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5, 1e-5, 0.0)
        elif fused:
            residual = torch.randn(M, ns[0], device="cuda", dtype=torch.bfloat16)
        try:
            weights = [layer.weight for layer in layers]
            got = module.nf4_gemv_stream(x, weights, activation, norm=norm, residual=residual)
            ref = module.nf4_gemv_stream_reference(x, weights, activation, norm=norm, residual=residual)
            err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            ms = graph_ms(lambda: module.nf4_gemv_stream(x, [layer.weight for layer in next_set()], activation,
                                                         norm=norm, residual=residual))
        except Exception as error:  # a config the compiler rejects: say so, keep sweeping
            report(kind="nf4stream", group=group, M=M, config=list(config), fused=fused,
                   error=str(error).splitlines()[0][:200])
            return
        gbps = nbytes / ms / 1e6
        report(kind="nf4stream", group=group, M=M, impl="triton", config=list(config), fused=fused, ms=round(ms, 4),
               gbps=round(gbps, 1), max_err=round(err, 4), vs_gemv_4bit=round(gbps / BASELINE[group], 2)
               if group in BASELINE else None)
        if not fused and gbps > STREAM_BEST.get(group, (0.0, None))[0]:
            STREAM_BEST[group] = (gbps, config)

    try:
        for config in configs:
            run(config, fused=False)
        if group in STREAM_BEST:
            run(STREAM_BEST[group][1], fused=True)
    finally:
        module.CONFIG.clear()
        module.CONFIG.update(saved)


def bench_attention(M: int, length: int = 384) -> None:
    """One decode step's cache write + attention of one layer (32 query heads, 8 kv heads, 128 dims):
    index_copy_ x 2 + SDPA with the engine's mask, against kernels/decode_attention.py."""
    from velotune.kernels.decode_attention import decode_attention, decode_attention_reference

    H, Hkv, D = 32, 8, 128
    q = torch.randn(M, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(M, Hkv, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.randn(M, Hkv, length, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slot = torch.tensor([200], device="cuda")
    mask = (torch.arange(length, device="cuda") <= slot)[None, None, None, :].expand(M, 1, 1, length).contiguous()
    for name, fn in (("index_copy_ + sdpa", decode_attention_reference), ("triton", decode_attention)):
        ms = graph_ms(lambda: fn(q, k_new, v_new, k_cache, v_cache, mask, slot, D ** -0.5))
        report(kind="attention", M=M, length=length, impl=name, ms=round(ms, 4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    ap.add_argument("--rows", default="1")
    ap.add_argument("--kinds", default="bf16,nf4", help="bf16, nf4 (kernels/nf4_gemv.py), nf4stream")
    ap.add_argument("--groups", default=",".join(GROUPS))
    args = ap.parse_args()
    dense = [(bn, bk, w, False) for bn, bk, w in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8))]
    nf4 = [(bn, bk, w, p) for bn, bk, w, p in itertools.product((8, 16, 32), (256, 512, 1024), (4,), (True, False))]
    if args.quick:
        dense, nf4 = dense[:4], nf4[:4]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    with torch.no_grad():
        for M in (int(m) for m in args.rows.split(",")):
            if args.kinds != "nf4stream":
                bench_attention(M)
        for M in (int(m) for m in args.rows.split(",")):
            for group in args.groups.split(","):
                if "bf16" in args.kinds:
                    bench_dense(group, M, dense)
                if "nf4" in args.kinds.split(","):
                    bench_nf4(group, M, nf4)
                if "nf4stream" in args.kinds:
                    bench_nf4_stream(group, M, STREAM_CONFIGS[:3] if args.quick else STREAM_CONFIGS)
                torch.cuda.empty_cache()
    for kind in ("bf16", "nf4"):  # the config with the least time over the groups it ran (one line each)
        for glu in (False, True):
            runs = [(ms, config) for (k, g, config), ms in BEST.items() if k == kind and g == glu]
            if runs:
                print(f"BEST {kind} {'glu' if glu else 'dense'} {','.join(str(v) for v in min(runs)[1])}", flush=True)
    for group, (gbps, config) in STREAM_BEST.items():  # the stream kernel's best per group, gemv_4bit beside
        base = BASELINE.get(group)
        print(f"STREAM {group} best {','.join(str(v) for v in config)} {gbps / 1e3:.2f} TB/s"
              + (f" | gemv_4bit {base / 1e3:.2f} TB/s" if base else ""), flush=True)


if __name__ == "__main__":
    main()
