"""bench/bench_kernels.py stays runnable: its CPU dry run (tiny sizes, references) on a few ops."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"


def test_dry_run_prints_a_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--ops", "rms_norm", "swiglu", "rope"])
    table = capsys.readouterr().out
    assert "| rms_norm | 16 | torch reference |" in table
    assert "| rope | 16 | torch reference |" in table
