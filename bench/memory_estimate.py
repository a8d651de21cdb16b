"""velotune's memory estimate against the measured peak, on the GPU (issue 15: within +-15%).

Runs `bench_train.py --path fast` (its own process per row: a clean allocator) for the Llama-3.2-1B and
Llama-3.1-8B shapes x bf16/NF4 x 2K/32K tokens per micro-batch x gradient checkpointing on ("unsloth")
/ off, one warm-up and one measured step, and prints a Markdown table: the estimate the trainer would
print before training, the measured peak as `max_memory_reserved` (everything the allocator held, the
CUDA graphs' pool included), and their ratio. A row that runs out of memory says so.

  PYTHONPATH=src python bench/memory_estimate.py                       # every row
  PYTHONPATH=src python bench/memory_estimate.py --shapes llama1b --seqs 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("bench_train.py")


def row(shape: str, quant: str, seq: int, checkpointing: str) -> dict:
    batch = 2 if seq <= 2048 else 1
    cmd = [sys.executable, str(BENCH), "--path", "fast", "--shape", shape, "--quant", quant, "--seq", str(seq),
           "--batch", str(batch), "--accum", "1", "--steps", "1", "--warmup", "1", "--checkpointing", checkpointing]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    base = dict(shape=shape, quant=quant, seq=seq, batch=batch, checkpointing=checkpointing)
    if lines:
        return {**base, **json.loads(lines[-1][len("RESULT "):])}
    oom = "OutOfMemoryError" in out.stderr or "out of memory" in out.stderr
    return {**base, "error": "out of memory" if oom else out.stderr.strip().splitlines()[-1:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama1b", "llama8b"])
    parser.add_argument("--quants", nargs="+", default=["none", "nf4"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 32768])
    parser.add_argument("--checkpointing", nargs="+", default=["unsloth", "false"])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| shape | weights | tokens (batch x seq) | checkpointing | estimate GiB | measured reserved GiB "
          "| estimate / measured | pinned host GiB (estimate) |", flush=True)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for shape, quant, seq, ckpt in itertools.product(args.shapes, args.quants, args.seqs, args.checkpointing):
        r = row(shape, quant, seq, ckpt)
        rows.append(r)
        weights = "NF4" if quant == "nf4" else "bf16"
        tokens = f"{r['batch']} x {seq}"
        if "error" in r:
            print(f"| {shape} | {weights} | {tokens} | {ckpt} | - | {r['error']} | - | - |", flush=True)
            continue
        ratio = r["estimate_gib"] / r["reserved_gib"]
        print(f"| {shape} | {weights} | {tokens} | {ckpt} | {r['estimate_gib']:.2f} | {r['reserved_gib']:.2f} "
              f"| {ratio:.2f} | {r['estimate_host_gib']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
