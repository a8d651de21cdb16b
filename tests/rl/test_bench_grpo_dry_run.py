"""bench/bench_grpo.py stays runnable: its CPU dry run (a tiny random Llama, one step) prints a row whose parts
add up to the step and whose reference pass shows when beta > 0."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_grpo.py"


def test_dry_run_prints_one_row_with_the_step_split(capsys):
    spec = importlib.util.spec_from_file_location("bench_grpo", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--steps", "1", "--gens", "2", "--completion", "4", "--beta", "0.04"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    row = json.loads(lines[0][len("RESULT "):])
    assert row["stack"] == "velotune" and row["gens"] == 2 and row["completion"] == 4
    assert row["engine"] == "velotune"
    assert row["generate_s"] > 0 and row["logps_s"] > 0 and row["train_s"] > 0
    assert abs(row["generate_s"] + row["logps_s"] + row["train_s"] - row["step_s"]) < 1e-2
