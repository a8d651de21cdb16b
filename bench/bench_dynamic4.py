"""Dynamic 4-bit on the real SmolLM2-135M-Instruct (CPU): held-out perplexity of the 16-bit model, plain NF4 and
dynamic NF4 at several memory budgets, with the folder sizes (issue 18 item 4).

Calibration: the bundled instruction rows 0-199 (`velotune.quantize.bundled_text("calibration")`); held out:
rows 200-299, never seen by the calibration. Each budget runs `choose_dynamic` whole (measurement included),
so the timing column is what a user waits for on this machine.

  PYTHONPATH=src python bench/bench_dynamic4.py                       # budgets +5%, +10% (default), +20%
  PYTHONPATH=src python bench/bench_dynamic4.py --extra 0.1 --max-tokens 1024
Prints RESULT lines (JSON) and a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", type=float, nargs="+", default=[0.05, 0.10, 0.20],
                        help="budgets as a fraction over the all-4-bit size")
    parser.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from velotune import FastLanguageModel
    from velotune.quantize import GIB, all_4bit_bytes, choose_dynamic

    torch.set_num_threads(args.threads)
    model, tokenizer = FastLanguageModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", load_in_4bit=False,
                                                         max_seq_length=args.seq_len, device_map="cpu")
    rows = []
    minimum = all_4bit_bytes(model)
    for extra in args.extra:
        start = time.perf_counter()
        report = choose_dynamic(model, tokenizer, budget_gib=minimum * (1 + extra) / GIB, max_tokens=args.max_tokens,
                                seq_len=args.seq_len, heldout_tokens=args.heldout_tokens)
        row = dict(extra=extra, seconds=round(time.perf_counter() - start, 1), kept=report.kept,
                   bytes_all_4bit=report.bytes_all_4bit, bytes_dynamic=report.bytes_dynamic,
                   calibration_tokens=report.calibration_tokens, heldout_tokens=report.heldout_tokens,
                   **{f"ppl_{k}": round(v, 3) for k, v in report.perplexity.items()})
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    sixteen = rows[0]["bytes_all_4bit"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    print("| weights | size MiB | vs all-4-bit | held-out ppl | gap to 16-bit closed | layers in 16-bit | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = rows[0]
    print(f"| 16-bit (bf16-rounded) | - | - | {first['ppl_16-bit']:.3f} | - | all | - |")
    print(f"| NF4 (all candidates) | {sixteen / 2**20:.1f} | +0% | {first['ppl_nf4']:.3f} | 0% | 0 | - |")
    for r in rows:
        closed = (r["ppl_nf4"] - r["ppl_dynamic"]) / (r["ppl_nf4"] - r["ppl_16-bit"])
        print(f"| dynamic NF4, budget +{r['extra']:.0%} | {r['bytes_dynamic'] / 2**20:.1f} | "
              f"{r['bytes_dynamic'] / r['bytes_all_4bit'] - 1:+.1%} | {r['ppl_dynamic']:.3f} | {closed:.0%} | "
              f"{len(r['kept'])} | {r['seconds']} |")


if __name__ == "__main__":
    main()
