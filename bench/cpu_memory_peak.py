"""What is alive at the peak of a step run on the CPU, grouped by where it was allocated: snapshot_peak.py for machines
without a GPU.

The GPU snapshot (`torch.cuda.memory._record_memory_history`) has no CPU counterpart, but the profiler records every
CPU allocation and free (`profile_memory=True`) with the Python stack around it (`with_stack=True`), saved autograd
tensors and the engine's gradient buffers included, and the CPU allocator frees at once (no cache), so replaying those
events gives what was alive at each moment. A step on the CPU runs the same fused functions and checkpoints as on the
GPU (fast path forced, offloading to host copies), so where its peak sits and what is alive there tells where a GPU
step's peak comes from before a device lease measures it (kernels, cuBLAS workspaces and the caching allocator's
rounding are the GPU's own and do not show here).

    with cpu_memory_peak.record() as rec:
        loss = model(**batch).loss; loss.backward()
    print(rec.report(top=14, exclude=cpu_memory_peak.HOST_COPIES))
"""

from __future__ import annotations

import contextlib
import dataclasses

# Frames we read, as the profiler names Python calls: "file.py(line): function", the path relative to the sys.path entry
# it was imported from ("velotune/fast/lora_linear.py", "transformers/...", a script's or test's bare file name).
OURS = ("velotune/", "transformers/", "peft/", "bench_", "test_", "torch/utils/checkpoint", "torch/autograd")
# The offloading checkpoint's host copies of layer inputs: pinned host memory on a GPU, not device memory.
HOST_COPIES = ("fast/checkpointing.py", ": __init__")


@dataclasses.dataclass
class Allocation:
    time_ns: int
    ptr: int
    size: int  # negative: a free
    frames: tuple[str, ...]  # Python calls around it, outermost first
    in_backward: bool
    op: str = ""  # the innermost operator it was made in (aten::mm, autograd::engine::evaluate_function: ...)


def _allocations(profiler) -> tuple[list[Allocation], int]:
    """(every CPU allocation and free, in time order; how many aten operators were called from outside another aten
    operator: from Python, autograd functions' bodies and the engine included, the host's share of a step that a
    GPU's launches follow)."""
    from torch._C._profiler import _EventType

    found = []
    calls = 0

    def walk(node, frames: tuple[str, ...], op: str, in_aten: bool = False):
        nonlocal calls
        if node.tag == _EventType.PyCall:
            frames = (*frames, node.name)
        elif node.tag == _EventType.TorchOp:
            if node.name.startswith("aten::") and not in_aten:
                calls, in_aten = calls + 1, True
            op = op if node.name.startswith("aten::empty") and op else node.name  # the op, not its allocation call
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            found.append(Allocation(node.start_time_ns, f.ptr, f.alloc_size, frames,
                                    any("_engine_run_backward" in name for name in frames), op))
        for child in node.children:
            walk(child, frames, op, in_aten)

    for root in profiler.profiler.kineto_results.experimental_event_tree():
        walk(root, (), "")
    return sorted(found, key=lambda a: a.time_ns), calls


def site(frames: tuple[str, ...], depth: int) -> str:
    """The innermost `depth` frames in code we read, innermost first."""
    kept = [f for f in reversed(frames) if any(part in f for part in OURS)][:depth]
    names = [f.split("site-packages/")[-1].split("/work/main/")[-1] for f in kept]
    return " < ".join(names) or "? (no Python frame: autograd's engine, e.g. gradients)"


class Recording:
    def __init__(self):
        self.allocations: list[Allocation] = []
        self.calls = 0  # aten operators called from outside another aten operator

    def peak(self, forward_only: bool = False, exclude: tuple[str, ...] = ()) -> tuple[int, list[Allocation]]:
        """(bytes above the recording's start at its peak, the allocations alive then). `forward_only`: up to the first
        allocation made inside a backward. `exclude`: allocations with a frame containing all of these strings (and their
        frees) are left out, e.g. HOST_COPIES."""
        alive: dict[int, Allocation] = {}
        current = best = 0
        at_best: list[Allocation] = []
        for a in self.allocations:
            if forward_only and a.in_backward:
                break
            if a.size > 0:
                if exclude and any(all(part in f for part in exclude) for f in a.frames):
                    continue
                alive[a.ptr] = a
                current += a.size
            elif a.ptr in alive:
                current -= alive.pop(a.ptr).size
            if current > best:
                best, at_best = current, list(alive.values())
        return best, at_best

    def report(self, top: int = 14, depth: int = 3, exclude: tuple[str, ...] = ()) -> str:
        lines = [f"== aten operators called in the step (not from inside another): {self.calls}"]
        for label, forward_only in (("step", False), ("forward", True)):
            total, alive = self.peak(forward_only, exclude)
            groups: dict[str, list[int]] = {}
            for a in alive:
                entry = groups.setdefault(f"{site(a.frames, depth)} [{a.op}]", [0, 0])
                entry[0] += a.size
                entry[1] += 1
            lines.append(f"== {label}: peak {total / 2**20:.1f} MiB above the recording's start, {len(alive)} blocks")
            for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
                lines.append(f"  {size / 2**20:9.1f} MiB x {count:4d}  {where}")
        return "\n".join(lines)


@contextlib.contextmanager
def record():
    """Profile the block's CPU allocations; the Recording is filled when the block ends."""
    from torch.profiler import ProfilerActivity, profile

    recording = Recording()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as profiler:
        yield recording
    recording.allocations, recording.calls = _allocations(profiler)
