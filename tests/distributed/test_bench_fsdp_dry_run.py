"""bench/bench_fsdp.py stays runnable before GPU time is spent on it: its dry run (tiny shape, 2 CPU
processes under one torchrun launch) runs both engines in both modes (full fine-tuning and LoRA), with
velotune's model built on the meta device, sharded, then made shard by shard; its per-GPU summary."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_fsdp", ROOT / "bench" / "bench_fsdp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow  # one torchrun launch of two fresh processes (20-50 s on two shared cores)
def test_dry_run_gives_a_record_per_engine_and_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    records = load_bench().main(["--dry-run", "--scratch", str(tmp_path), "--json", str(tmp_path / "fsdp.json")])
    assert [(r["engine"], r["mode"], r["nproc"]) for r in records] == [
        ("velotune", "full", 2), ("peer", "full", 2), ("velotune", "lora", 2), ("peer", "lora", 2)]
    assert records[0]["ran"].startswith("FSDP2") and records[2]["ran"].startswith("FSDP2")
    for record in records:
        assert record["fits"] and record["tokens_per_s"] > 0 and record["scaling_efficiency"] == 1.0
        assert all(math.isfinite(g["loss_last"]) for g in record["per_gpu"])
    full, lora = records[0]["trainable"], records[2]["trainable"]
    assert records[1]["trainable"] == full and records[3]["trainable"] == lora  # the same model for both engines
    # tiny shape (hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads): r=16 on the 7 projections
    per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert lora == 2 * per_layer < full
    assert (tmp_path / "fsdp.json").is_file()


def test_summary_per_gpu_against_the_smallest_count_that_fit():
    bench = load_bench()

    def record(nproc, tokens, peaks, engine="velotune"):
        return dict(engine=engine, mode="full", shape="llama8b", nproc=nproc, fits=tokens is not None,
                    tokens_per_s=tokens, per_gpu=[{"peak_gib": p} for p in peaks])

    records = bench.summarize([record(1, None, [None]), record(2, 8000.0, [50.0, 51.5]),
                               record(4, 14400.0, [30.0] * 4), record(2, 6000.0, [60.0, 60.0], engine="peer")])
    assert [r["tokens_per_s_per_gpu"] for r in records] == [None, 4000.0, 3600.0, 3000.0]
    assert [r["efficiency_vs_nproc"] for r in records] == [2, 2, 2, 2]  # one GPU did not fit: 2 is the base
    assert [r["scaling_efficiency"] for r in records] == [None, 1.0, 0.9, 1.0]
    assert [r["peak_gib_max"] for r in records] == [None, 51.5, 30.0, 60.0]
    assert "| velotune | full | llama8b | 4 | 14,400 | 3,600 | 30.0 | 0.90 (vs 2) |" in bench.table(records)
