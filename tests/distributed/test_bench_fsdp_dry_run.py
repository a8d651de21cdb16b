"""bench/bench_fsdp.py stays runnable before GPU time is spent on it: its dry run (tiny shape, 2 CPU
processes under one torchrun launch) runs both engines, velotune's sharding and transformers.Trainer's."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # one torchrun launch of two fresh processes (about 50 s on two shared cores)
def test_dry_run_gives_a_record_per_engine(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    spec = importlib.util.spec_from_file_location("bench_fsdp", ROOT / "bench" / "bench_fsdp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = bench.main(["--dry-run", "--scratch", str(tmp_path), "--json", str(tmp_path / "fsdp.json")])
    assert [(r["engine"], r["nproc"]) for r in records] == [("velotune", 2), ("peer", 2)]
    assert records[0]["ran"].startswith("FSDP2")
    for record in records:
        assert record["fits"] and record["tokens_per_s"] > 0
        assert all(math.isfinite(g["loss_last"]) for g in record["per_gpu"])
    assert (tmp_path / "fsdp.json").is_file()
