"""bench/snapshot_peak.py replays a torch.cuda.memory trace: the peak is the most memory allocated at once above the
recording's start, the blocks alive then are grouped by their frames, and the forward's peak stops at the first
allocation made inside a backward. The trace is written here in the snapshot's format (recording one needs CUDA)."""

import importlib.util
import lzma
import pickle
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "snapshot_peak.py"
MIB = 2**20


def _module():
    spec = importlib.util.spec_from_file_location("snapshot_peak", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frames(name, function="forward"):
    return [{"filename": "/usr/lib/python3/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
            {"filename": f"/work/main/src/velotune/{name}.py", "line": 7, "name": function}]


def _alloc(addr, mib, where, function="forward"):
    return {"action": "alloc", "addr": addr, "size": mib * MIB, "frames": _frames(where, function)}


def _free(addr):
    return {"action": "free_completed", "addr": addr, "size": 0, "frames": []}


def _trace():
    alloc, free = _alloc, _free
    return [alloc(1, 10, "layers"), alloc(2, 10, "layers"), alloc(3, 5, "mlp"), free(3),  # forward peak: 25 MiB
            alloc(4, 30, "mlp", "backward"), free(1), alloc(5, 2, "mlp", "backward"), free(4), free(2), free(5)]


def test_the_peak_and_what_is_alive_then(tmp_path, capsys):
    module = _module()
    peak, alive = module.alive_at_peak(_trace())
    assert peak == 50 * MIB and sorted(alive) == [1, 2, 4]  # 10 + 10 + 30, the 5 MiB block freed before
    peak, alive = module.alive_at_peak(_trace(), forward_only=True)
    assert peak == 25 * MIB and sorted(alive) == [1, 2, 3]
    path = tmp_path / "snap.pickle.xz"
    with lzma.open(path, "wb") as handle:
        pickle.dump({"device_traces": [_trace()]}, handle)
    module.report(str(path), top=5, depth=1)
    out = capsys.readouterr().out
    assert "(step): peak 0.049 GiB" in out and "(forward): peak 0.024 GiB" in out
    assert "(end): alive at the dump: 0.000 GiB, 0 blocks" in out  # everything was freed by the trace's end
    size, alive = module.alive_at_end(_trace()[:5])  # stopped after the backward's 30 MiB: 1, 2 and 4 alive
    assert size == 50 * MIB and sorted(alive) == [1, 2, 4]
    assert "30.0 MiB x   1  src/velotune/mlp.py:7:backward" in out
    assert "20.0 MiB x   2  src/velotune/layers.py:7:forward" in out
