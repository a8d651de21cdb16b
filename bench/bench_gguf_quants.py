"""GGUF quantization speed: every method over a Llama-3-8B-shaped set of weights.

For each method, every tensor gets llama.cpp's type for it (``tensor_qtype``) and is quantized by
``velotune.quant.gguf.quantize`` on the current device (CUDA when present). Prints a markdown
table: seconds for the whole 8B set, throughput and the file size the tensors take.

    PYTHONPATH=src python bench/bench_gguf_quants.py                 # GPU: the full 8B set
    PYTHONPATH=src python bench/bench_gguf_quants.py --sample-rows 256 --threads 2   # CPU

With ``--sample-rows R`` (default on CPU) each distinct (type, row length) is timed on R rows and
the time is scaled by the number of rows of that kind in the 8B set: an extrapolation, labelled
as such. Quantization is row-independent, so the scaling is linear apart from a fixed
per-call overhead, which makes the extrapolation slightly pessimistic.
"""

import argparse
import time
from collections import defaultdict

import gguf
import torch

from velotune.quant import gguf as vg

HIDDEN, MLP, KV, VOCAB, LAYERS = 4096, 14336, 1024, 128256, 32


def llama3_8b_tensors() -> list[tuple[str, tuple[int, int]]]:
    """GGUF names and torch shapes of Llama-3-8B's 2-D weights (norms are F32 copies)."""
    names = [("token_embd.weight", (VOCAB, HIDDEN)), ("output.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        b = f"blk.{i}."
        names += [(b + "attn_q.weight", (HIDDEN, HIDDEN)), (b + "attn_k.weight", (KV, HIDDEN)),
                  (b + "attn_v.weight", (KV, HIDDEN)), (b + "attn_output.weight", (HIDDEN, HIDDEN)),
                  (b + "ffn_gate.weight", (MLP, HIDDEN)), (b + "ffn_up.weight", (MLP, HIDDEN)),
                  (b + "ffn_down.weight", (HIDDEN, MLP))]
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(method: str, device: torch.device, sample_rows: int | None, dtype: torch.dtype) -> dict:
    """Time one method; returns seconds (measured or extrapolated), values and output bytes."""
    groups: dict[tuple[gguf.GGMLQuantizationType, int], int] = defaultdict(int)  # (type, cols) -> rows
    for name, (rows, cols) in llama3_8b_tensors():
        groups[(vg.tensor_qtype(method, name, LAYERS, (rows, cols), n_gqa=4), cols)] += rows
    gen = torch.Generator(device=device).manual_seed(0)
    seconds, values, nbytes = 0.0, 0, 0
    for (qtype, cols), rows in groups.items():
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes += rows * cols // block * type_size
        values += rows * cols
        done = 0
        timed_rows = rows if sample_rows is None else min(rows, sample_rows)
        step = max(1, (1 << 28) // cols)  # generate at most 256M values at a time
        elapsed = 0.0
        while done < timed_rows:
            r = min(step, timed_rows - done)
            w = (torch.randn(r, cols, generator=gen, device=device) * 0.02).to(dtype)
            _sync(device)
            t0 = time.perf_counter()
            vg.quantize(w, qtype)
            _sync(device)
            elapsed += time.perf_counter() - t0
            done += r
        seconds += elapsed * rows / timed_rows
    return {"seconds": seconds, "values": values, "bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q2_k", "q3_k_m", "f16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample-rows", type=int, default=None,
                        help="time this many rows per (type, row length) and extrapolate (default: 256 on CPU, all on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sample = args.sample_rows if args.sample_rows is not None else (256 if device.type == "cpu" else None)
    dtype = torch.bfloat16
    if device.type == "cuda":
        vg.quantize(torch.randn(256, 4096, device=device), gguf.GGMLQuantizationType.Q4_K)  # warm-up
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mode = "measured on every tensor" if sample is None else f"extrapolated from {sample} rows per (type, row length)"
    print(f"GGUF quantization of Llama-3-8B-shaped weights (bf16 input) on {where}; {mode}\n")
    print("| method | seconds (8B) | Mvalues/s | output GiB |")
    print("|---|---:|---:|---:|")
    for method in args.methods:
        r = bench_method(vg.normalize_method(method), device, sample, dtype)
        print(f"| {method} | {r['seconds']:.1f} | {r['values'] / r['seconds'] / 1e6:.1f} | {r['bytes'] / 2**30:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
