"""What the machine's host side costs: kernel launch rate and pinned-memory copy bandwidth.

Why: the same training step can run at different speeds on two lent machines whose GPUs are the
same H200 (session 11: the FP8 8B rows ran 22-31% slower on the single-GPU machine than on the
two-GPU one while Unsloth's ran 3-8% slower). A step with many small launches is bound by the
host's launch rate; "unsloth" checkpointing copies each layer's input to pinned host memory and
back (fast/checkpointing.py), bound by the copy bandwidth if the GPU work per layer is shorter.
This prints both, with the kernel (uname) and CPU model, so rows from different machines can be
read side by side.

  python bench/host_probe.py            # RESULT {...} on one line
"""

from __future__ import annotations

import json
import platform
import time

import torch


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def launch_us(n: int = 20000) -> float:
    """Host microseconds per launch of a tiny elementwise kernel (the GPU finishes each at once)."""
    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def copy_gbs(mb: int = 32, pieces: int = 32, pinned: bool = True) -> dict:
    """GB/s of `pieces` device -> host copies of `mb` MB each on a side stream (the offload pattern), then
    host -> device back, timed with CUDA events."""
    src = torch.empty(mb << 19, dtype=torch.bfloat16, device="cuda")  # mb MB
    host = [torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned) for _ in range(pieces)]
    stream = torch.cuda.Stream()
    res = {}
    for name in ("d2h", "h2d"):
        for warm in (True, False):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                start.record()
                for h in host:
                    if name == "d2h":
                        h.copy_(src, non_blocking=pinned)
                    else:
                        src.copy_(h, non_blocking=pinned)
                end.record()
            torch.cuda.synchronize()
            if not warm:
                res[name] = round(pieces * mb * 2**20 / (start.elapsed_time(end) / 1e3) / 1e9, 1)
    return res


def main() -> None:
    res = dict(kernel=platform.release(), cpu=_cpu_model(), gpu=torch.cuda.get_device_name(),
               launch_us=round(launch_us(), 2), pinned_gbs=copy_gbs(), pageable_gbs=copy_gbs(pieces=8, pinned=False))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
