"""Kernel benchmarks: each velotune kernel vs its PyTorch reference (and Liger-Kernel's, when
``liger_kernel`` is importable, and bitsandbytes' NF4 dequantization, when installed).

Llama-3.1-8B sizes (hidden 4096, MLP 14336, 32/8 heads of 128, vocab 128256), 4096 and 16384
tokens, bf16; forward+backward time (median of CUDA-event timings) and peak memory above the
inputs. Prints a markdown table for BENCHMARKS.md.

    PYTHONPATH=src python bench/bench_kernels.py                  # on a CUDA machine
    PYTHONPATH=src python bench/bench_kernels.py --tokens 4096 --ops rms_norm swiglu
    PYTHONPATH=src python bench/bench_kernels.py --dry-run        # CPU, tiny sizes, reference only

The dry run checks that every case builds and runs (CI-sized); its timings mean nothing.
"""

import argparse
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from velotune import kernels as vk


@dataclass(frozen=True)
class Sizes:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LLAMA_8B = Sizes(hidden=4096, mlp=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
TINY = Sizes(hidden=64, mlp=160, heads=4, kv_heads=2, head_dim=16, vocab=256)


@dataclass(frozen=True)
class Case:
    """One implementation of one op: ``step()`` runs forward+backward once."""

    op: str
    impl: str
    step: Callable[[], None]


@dataclass(frozen=True)
class Result:
    op: str
    tokens: int
    impl: str
    ms: float
    peak_mib: float | None
    error: str | None = None  # why this implementation did not run (out of memory, a peer's API changed)


def _liger():
    try:
        from liger_kernel.transformers import functional as liger
    except ImportError:
        return None
    return liger


def _backward(out: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    out.backward(grad)


def rms_norm_cases(n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    x = torch.randn(n, s.hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(s.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, s.hidden, device=device, dtype=dtype)
    cases = [Case("rms_norm", "torch reference", lambda: _backward(vk.rms_norm_reference(x, w, 1e-5), dy))]
    if not reference_only:
        cases.append(Case("rms_norm", "velotune", lambda: _backward(vk.rms_norm(x, w, 1e-5), dy)))
        liger = _liger()
        if liger is not None and hasattr(liger, "liger_rms_norm"):
            # in_place=False: Liger would otherwise overwrite dy, which the next step reuses
            options = {"in_place": False} if "in_place" in inspect.signature(liger.liger_rms_norm).parameters else {}
            cases.append(Case("rms_norm", "liger", lambda: _backward(liger.liger_rms_norm(x, w, 1e-5, **options), dy)))
    return cases


def rope_cases(n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    q0 = torch.randn(1, s.heads, n, s.head_dim, device=device, dtype=dtype, requires_grad=True)
    k0 = torch.randn(1, s.kv_heads, n, s.head_dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * torch.rand(s.head_dim // 2, device=device)
    emb = torch.cat((angles, angles), -1)[None]  # (1, T, Dh), halves duplicated
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def run(fn):
        q, k = q0 * 1, k0 * 1  # non-leaf inputs (as projections are), same cost for every implementation
        q, k = fn(q, k)
        (q.float().sum() + k.float().sum()).backward()

    cases = [Case("rope", "torch reference", lambda: run(lambda q, k: vk.apply_rope_reference(q, k, cos, sin)))]
    if not reference_only:
        cases.append(Case("rope", "velotune", lambda: run(lambda q, k: vk.apply_rope(q, k, cos, sin))))
        liger = _liger()
        if liger is not None and hasattr(liger, "liger_rope"):
            cases.append(Case("rope", "liger", lambda: run(lambda q, k: liger.liger_rope(q, k, cos, sin))))
    return cases


def glu_cases(op: str, n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    gate = torch.randn(n, s.mlp, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(n, s.mlp, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, s.mlp, device=device, dtype=dtype)
    if op == "swiglu":
        ours, reference, liger_name = vk.swiglu, vk.swiglu_reference, "liger_swiglu"
    else:
        ours, reference, liger_name = vk.geglu, vk.geglu_reference, "liger_geglu"
    cases = [Case(op, "torch reference", lambda: _backward(reference(gate, up), dy))]
    if not reference_only:
        cases.append(Case(op, "velotune", lambda: _backward(ours(gate, up), dy)))
        liger = _liger()
        if liger is not None and hasattr(liger, liger_name):
            fn = getattr(liger, liger_name)
            cases.append(Case(op, "liger", lambda: _backward(fn(gate, up), dy)))
    return cases


def cross_entropy_cases(n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    """LoRA setting: the LM head is frozen, only the hidden states need a gradient."""
    hidden = torch.randn(n, s.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(s.vocab, s.hidden, device=device) * s.hidden**-0.5).to(dtype)
    labels = torch.randint(0, s.vocab, (n,), device=device)
    labels[: n // 8] = -100
    cases = [
        Case("linear_cross_entropy", "torch reference",
             lambda: vk.fused_linear_cross_entropy_reference(hidden, weight, labels).backward())
    ]  # fmt: skip
    if not reference_only:
        cases.append(
            Case(
                "linear_cross_entropy",
                "velotune",
                lambda: vk.fused_linear_cross_entropy(hidden, weight, labels).backward(),
            )
        )
        liger = _liger()
        if liger is not None and hasattr(liger, "liger_fused_linear_cross_entropy"):
            liger_ce = liger.liger_fused_linear_cross_entropy
            cases.append(Case("linear_cross_entropy", "liger", lambda: liger_ce(hidden, weight, labels).backward()))
    return cases


def logprobs_cases(n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    hidden = torch.randn(1, n, s.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(s.vocab, s.hidden, device=device) * s.hidden**-0.5).to(dtype)
    ids = torch.randint(0, s.vocab, (1, n), device=device)
    cases = [
        Case("logprobs", "torch reference", lambda: vk.chunked_logprobs_reference(hidden, weight, ids).sum().backward())
    ]
    if not reference_only:
        cases.append(Case("logprobs", "velotune", lambda: vk.chunked_logprobs(hidden, weight, ids).sum().backward()))
    return cases


def _nf4_linear(rows: int, cols: int, device, dtype):
    """A real bitsandbytes Linear4bit (double-quantized NF4), as QLoRA holds its base weights."""
    from velotune.quant.linear import to_linear4bit

    linear = torch.nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    return to_linear4bit(linear)


def nf4_cases(n: int, s: Sizes, device, dtype, reference_only: bool) -> list[Case]:
    """Dequantize one (MLP, hidden) NF4 weight (double-quantized); forward only. ``n`` unused.

    "velotune" is the QLoRA hot path (``dequantize_nf4_weight`` on a Params4bit: cached launch);
    "velotune validating" the general ``dequantize_nf4`` that checks its arguments every call.
    """
    weight = _nf4_linear(s.mlp, s.hidden, device, dtype).weight
    packed, st = weight.data, weight.quant_state
    args = (packed, st.absmax, st.code)
    kwargs = dict(
        nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code, offset=st.offset,
        blocksize=st.blocksize, shape=st.shape, dtype=st.dtype,
    )  # fmt: skip
    cases = [Case("dequantize_nf4", "torch reference", lambda: vk.dequantize_nf4_reference(*args, **kwargs))]
    if not reference_only:
        cases.append(Case("dequantize_nf4", "velotune", lambda: vk.dequantize_nf4_weight(weight)))
        cases.append(Case("dequantize_nf4", "velotune validating", lambda: vk.dequantize_nf4(*args, **kwargs)))
        try:
            import bitsandbytes.functional as bnbF

            cases.append(Case("dequantize_nf4", "bitsandbytes", lambda: bnbF.dequantize_4bit(packed, st)))
        except ImportError:
            pass
    return cases


def _nf4_bytes(numel: int, blocksize: int, dtype: torch.dtype) -> int:
    """Traffic of one dequantization: packed codes + uint8 absmax codes in, ``dtype`` values out."""
    return numel // 2 + -(-numel // blocksize) + numel * torch.finfo(dtype).bits // 8


def nf4_details(s: Sizes, device, dtype, dry_run: bool, warmup: int, iters: int, host_calls: int) -> str:
    """GB/s of each NF4 dequantization (and a tile/warps sweep of ours), then host time per call.

    The host table launches ``host_calls`` dequantizations of a small (256 x 256) weight back to
    back and divides the wall time before the final synchronize: what the QLoRA step pays in
    Python per base weight when the GPU is not the bottleneck (7 weights x 3 passes per layer).
    """
    import bitsandbytes.functional as bnbF

    from velotune.kernels import nf4 as nf4_kernel

    weight = _nf4_linear(s.mlp, s.hidden, device, dtype).weight
    packed, st = weight.data, weight.quant_state
    moved = _nf4_bytes(st.shape.numel(), st.blocksize, st.dtype)
    cases = [
        Case("dequantize_nf4", "velotune", lambda: vk.dequantize_nf4_weight(weight)),
        Case("dequantize_nf4", "bitsandbytes", lambda: bnbF.dequantize_4bit(packed, st)),
    ]
    if not dry_run:
        for tile_values in (2048, 4096, 8192, 16384):
            for num_warps in (2, 4, 8):
                launch = nf4_kernel._prepare(
                    device, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset, st.blocksize,
                    st.state2.blocksize, st.shape, st.dtype, tile_values=tile_values, num_warps=num_warps,
                )  # fmt: skip
                impl = f"velotune tile={tile_values} warps={num_warps}"
                cases.append(Case("dequantize_nf4", impl, lambda launch=launch: launch(packed)))
    lines = [
        f"NF4 dequantization of {st.shape[0]} x {st.shape[1]} -> {str(st.dtype).removeprefix('torch.')}, "
        f"{moved / 1e6:.1f} MB moved per call (0.5 B + 1/{st.blocksize} B in, {torch.finfo(st.dtype).bits // 8} B out "
        "per value)",
        "",
        "| implementation | ms | GB/s |",
        "| --- | ---: | ---: |",
    ]
    for case in cases:
        ms, _ = measure(case, device, warmup, iters)
        lines.append(f"| {case.impl} | {ms:.4f} | {moved / (ms * 1e-3) / 1e9:,.0f} |")
    small = _nf4_linear(256, 256, device, dtype).weight
    small_args = (small.data, small.quant_state.absmax, small.quant_state.code)
    small_state = small.quant_state
    small_kwargs = dict(
        nested_absmax=small_state.state2.absmax, nested_quant_map=small_state.state2.code, offset=small_state.offset,
        blocksize=small_state.blocksize, shape=small_state.shape, dtype=small_state.dtype,
    )  # fmt: skip
    host = {
        "velotune dequantize_nf4_weight (cached)": lambda: vk.dequantize_nf4_weight(small),
        "velotune dequantize_nf4 (validating)": lambda: vk.dequantize_nf4(*small_args, **small_kwargs),
        "bitsandbytes dequantize_4bit": lambda: bnbF.dequantize_4bit(small.data, small_state),
    }
    lines += ["", f"Host time per call, 256 x 256 weight, {host_calls} calls back to back", "",
              "| implementation | us per call |", "| --- | ---: |"]  # fmt: skip
    for impl, call in host.items():
        for _ in range(10):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(host_calls):
            call()
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lines.append(f"| {impl} | {elapsed / host_calls * 1e6:.1f} |")
    return "\n".join(lines)


OPS = {
    "rms_norm": rms_norm_cases,
    "rope": rope_cases,
    "swiglu": lambda *a: glu_cases("swiglu", *a),
    "geglu": lambda *a: glu_cases("geglu", *a),
    "linear_cross_entropy": cross_entropy_cases,
    "logprobs": logprobs_cases,
    "dequantize_nf4": nf4_cases,
}


def measure(case: Case, device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Median milliseconds of ``case.step`` and its peak memory above what was allocated before.

    Leaf gradients accumulate across steps (the same extra add for every implementation); the
    warm-up allocates them, so the peak counts the op's own temporaries and saved tensors.
    """
    for _ in range(warmup):
        case.step()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            case.step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak


def run(ops: list[str], token_counts: list[int], dry_run: bool, warmup: int, iters: int) -> list[Result]:
    device = torch.device("cpu" if dry_run else "cuda")
    sizes = TINY if dry_run else LLAMA_8B
    dtype = torch.float32 if dry_run else torch.bfloat16
    results = []
    for op in ops:
        for n in token_counts if op != "dequantize_nf4" else token_counts[:1]:
            for case in OPS[op](n, sizes, device, dtype, dry_run):
                try:
                    ms, peak = measure(case, device, warmup, iters)
                    results.append(Result(op, n, case.impl, ms, peak))
                except Exception as error:  # noqa: BLE001 - one failing implementation must not end the run
                    if dry_run:
                        raise
                    reason = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else repr(error)[:80]
                    results.append(Result(op, n, case.impl, float("nan"), None, reason))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def markdown(results: list[Result]) -> str:
    lines = [
        "| op | tokens | implementation | fwd+bwd ms | peak extra MiB | vs reference |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    reference_ms = {(r.op, r.tokens): r.ms for r in results if r.impl == "torch reference"}
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.op} | {r.tokens:,} | {r.impl} | failed: {r.error} | - | - |")
            continue
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:,.0f}"
        ref = reference_ms.get((r.op, r.tokens))
        speedup = f"{ref / r.ms:.2f}x" if ref and r.ms == r.ms and r.ms > 0 else "-"
        tokens = "-" if r.op == "dequantize_nf4" else f"{r.tokens:,}"
        lines.append(f"| {r.op} | {tokens} | {r.impl} | {r.ms:.3f} | {peak} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, reference implementations only")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 4096 16384)")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --dry-run for a CPU smoke run")
    tokens = args.tokens or ([16] if args.dry_run else [4096, 16384])
    warmup, iters = (1, 1) if args.dry_run else (args.warmup, args.iters)
    results = run(args.ops, tokens, args.dry_run, warmup, iters)
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        print(
            f"{props.name}, torch {torch.__version__}, bf16, Llama-3.1-8B sizes; liger: {'yes' if _liger() else 'no'}\n"
        )
    print(markdown(results))
    if "dequantize_nf4" in args.ops:
        sizes, dtype = (TINY, torch.float32) if args.dry_run else (LLAMA_8B, torch.bfloat16)
        device = torch.device("cpu" if args.dry_run else "cuda")
        print("\n" + nf4_details(sizes, device, dtype, args.dry_run, warmup, iters, 10 if args.dry_run else 1000))


if __name__ == "__main__":
    main()
