"""What is alive at the peak of a `torch.cuda.memory` snapshot, grouped by where it was allocated.

`bench_vision.py run --snapshot FILE` (and any `torch.cuda.memory._dump_snapshot`) records every allocation and free of
one step with its Python stack. This replays that trace, finds the moment the most memory was allocated above the
recording's start (the whole step, and the forward alone: the events before the first allocation made inside a
`backward`), and sums the blocks alive then by their first frames in velotune, transformers, PEFT or a peer's code;
then the same for the blocks still alive when the snapshot was dumped (`bench_vision.py --snapshot-load`: what loading
left allocated).
Session 14 found the vision rows' memory gaps with it (BENCHMARKS.md "Session 14"). Reads .pickle or .pickle.xz.

  python bench/snapshot_peak.py /tmp/snap/qwen_velotune_nf4.pickle.xz [more files] [--top 14] [--depth 3]
"""

from __future__ import annotations

import argparse
import collections
import lzma
import pickle

OURS = ("velotune", "transformers/", "unsloth", "peft/", "bench_vision", "torch/utils/checkpoint", "torch/autograd")


def where(frames: list[dict], depth: int) -> str:
    """The first `depth` frames in the code we read, innermost first, as file:line:function."""
    kept = [f for f in frames if any(part in f["filename"] for part in OURS)][:depth]
    names = [f"{f['filename'].split('site-packages/')[-1].split('/work/main/')[-1]}:{f['line']}:{f['name']}"
             for f in kept]
    return " < ".join(names) or "? (allocated outside Python: autograd's engine, e.g. gradients)"


def alive_at_peak(trace: list[dict], forward_only: bool = False) -> tuple[int, dict]:
    """(peak bytes above the recording's start, {address: alloc event} alive at that moment)."""
    alive, current, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if forward_only and any(f["name"] == "backward" for f in event.get("frames", [])):
            break
        if event["action"] == "alloc":
            alive[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(alive)
        elif event["action"] == "free_completed" and event["addr"] in alive:
            current -= alive.pop(event["addr"])["size"]
    return peak, at_peak


def alive_at_end(trace: list[dict]) -> tuple[int, dict]:
    """(bytes allocated during the recording and still alive when it was dumped, {address: alloc event})."""
    alive = {}
    for event in trace:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    return sum(e["size"] for e in alive.values()), alive


def report(path: str, top: int, depth: int) -> None:
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rb") as handle:
        trace = pickle.load(handle)["device_traces"][0]
    for label, forward_only in (("step", False), ("forward", True), ("end", None)):
        peak, alive = alive_at_end(trace) if forward_only is None else alive_at_peak(trace, forward_only)
        what = "alive at the dump: {}" if forward_only is None else "peak {} above the recording's start"
        print(f"== {path} ({label}): {what.format(f'{peak / 2**30:.3f} GiB')}, {len(alive)} blocks")
        sizes, counts = collections.Counter(), collections.Counter()
        for event in alive.values():
            key = where(event.get("frames", []), depth)
            sizes[key] += event["size"]
            counts[key] += 1
        for key, size in sizes.most_common(top):
            print(f"  {size / 2**20:9.1f} MiB x{counts[key]:4d}  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", nargs="+")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    for path in args.snapshots:
        report(path, args.top, args.depth)


if __name__ == "__main__":
    main()
