"""bench/cpu_memory_peak.py replays the profiler's CPU allocations: the peak is the most allocated at once above the
recording's start, what is alive then is grouped by its innermost frames in code we read (a test file counts), the
forward's peak stops at the first allocation made inside a backward, and an excluded site leaves the count. Recorded
for real: known tensors allocated and freed under the profiler."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cpu_memory_peak.py"
MIB = 2**20


def _module():
    spec = importlib.util.spec_from_file_location("cpu_memory_peak", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def scratch() -> torch.Tensor:
    return torch.empty(8 * MIB, dtype=torch.uint8)


def kept(mib: int) -> torch.Tensor:
    return torch.empty(mib * MIB, dtype=torch.uint8)


def test_the_peak_what_is_alive_then_and_exclusion():
    module = _module()
    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB
    with module.record() as recording:
        a, b = kept(1), kept(2)
        del a
        c = kept(4)  # step and forward peak without scratch: b + c = 6 MiB
        s = scratch()
        del s, c
        (x * 2).sum().backward()  # the forward ends here: x * 2 and x's gradient are 1 MiB each
    total, alive = recording.peak(forward_only=True, exclude=("test_bench_cpu_memory_peak.py", ": scratch"))
    assert total == 6 * MIB and sorted(a.size for a in alive) == [2 * MIB, 4 * MIB]
    total, alive = recording.peak(forward_only=True)
    assert total == 14 * MIB and sorted(a.size for a in alive) == [2 * MIB, 4 * MIB, 8 * MIB]
    report = recording.report(exclude=("test_bench_cpu_memory_peak.py", ": scratch"))
    assert "== step: peak 6.0 MiB" in report and "== forward: peak 6.0 MiB" in report
    assert "6.0 MiB x    2  test_bench_cpu_memory_peak.py(" in report and "): kept" in report
    assert any(a.in_backward for a in recording.allocations)  # x's gradient, made by autograd's engine
    # aten operators: 4 empty, mul, sum, then backward's (the aten calls inside them are not counted)
    assert 6 <= recording.calls <= 16 and f"in the step (not from inside another): {recording.calls}" in report
    del b
