"""The first ten minutes: `velotune --help` and every subcommand's help run clean (no third-party
notices, no FutureWarning, no traceback on stderr), every argument is described, and velotune's own
calls raise no FutureWarning."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from velotune.cli import build_parser


def _velotune_command() -> list[str]:
    """The installed console script next to this Python, else the module (same code path)."""
    script = Path(sys.executable).parent / "velotune"
    if script.exists():
        return [str(script)]
    found = shutil.which("velotune")
    return [found] if found else [sys.executable, "-m", "velotune.cli"]


_EACH_SUBCOMMAND = """
import contextlib, sys
from velotune.cli import main
for command in ("train", "export", "chat"):
    with contextlib.suppress(SystemExit):
        main([command, "--help"])
"""


@pytest.mark.parametrize("how", ["console-script", "subcommands"])
def test_help_runs_clean(how):
    """`velotune --help` through the installed script; the subcommands' help in one more process
    (each process pays the imports, which is where the noise came from)."""
    command = [*_velotune_command(), "--help"] if how == "console-script" else [sys.executable, "-c",
                                                                                 _EACH_SUBCOMMAND]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: velotune") == (1 if how == "console-script" else 3)
    for noise in ("kernels-community", "FutureWarning", "Traceback", "Warning"):
        assert noise not in result.stderr, f"{noise!r} on stderr ({how}):\n{result.stderr}"
    assert result.stderr.strip() == ""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_argument_is_described():
    parser = build_parser()
    subparsers = _subparsers(parser)
    assert set(subparsers) == {"train", "export", "chat", "consolidate", "quantize"}
    for name, sub in [("velotune", parser), *subparsers.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{name}: argument {action.dest!r} has no help text"


def test_kernels_community_notice_is_dropped_and_nothing_else():
    """bitsandbytes logs it at import on AVX512-BF16 CPUs only; the record is sent here through the
    same logger, so the filter is exercised on every CPU."""
    import velotune  # noqa: F401 - installs the filter
    from velotune.quiet import BNB_CPU_LOGGER

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(BNB_CPU_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("some other bitsandbytes notice")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes notice"]
    assert logging.getLogger("bitsandbytes").filters == []  # nothing changed beyond that one logger


def test_our_calls_raise_no_future_warning(tmp_path):
    """get_peft_model (PEFT reads the deprecated is_gradient_checkpointing) and TrainingArguments
    (TRL's gradient_checkpointing default, renamed in transformers 5.24)."""
    from tiny import export_shapes as tiny
    from velotune import FastLanguageModel, TrainingArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FastLanguageModel.get_peft_model(tiny.model("llama"), r=4, use_gradient_checkpointing="unsloth")
        TrainingArguments(output_dir=str(tmp_path), report_to="none")
        TrainingArguments(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


@pytest.mark.parametrize("near_the_limit", [False, True])
def test_memory_estimate_line_is_shown_once(near_the_limit, capsys, caplog):
    """Logged (a warning near the device's memory, else info) and never also printed: both reached
    the terminal, the line twice."""
    import torch

    from velotune.training.memory import GIB, MemoryEstimate, check_memory

    est = MemoryEstimate(weights=GIB, trainable=0, gradients=0, optimizer=0, activations=0, tokens=64,
                         checkpointing=False)
    available = int(1.05 * GIB) if near_the_limit else 16 * GIB
    with caplog.at_level(logging.INFO, logger="velotune"):
        check_memory(est, available, "warn", torch.device("cpu"))
    printed = capsys.readouterr().out.count("velotune memory estimate:")
    logged = sum("velotune memory estimate:" in r.getMessage() for r in caplog.records)
    assert printed + logged == 1
