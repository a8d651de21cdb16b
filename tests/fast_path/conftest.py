"""The fast-path tests reuse the parity suite's tiny family configs (tests/models/tiny_models.py).

The kernel ops run through Triton's interpreter on the CPU only in tests that ask for it with
the `interpreted` fixture (tests/conftest.py turns the interpreter on for the whole session):
the interpreter costs seconds per model step, the kernels' own tests (tests/kernels/) check each
kernel against its reference, and elsewhere the ops' CPU path is that reference.
"""

import sys
from pathlib import Path

import pytest

import velotune.lora.fused_ops  # noqa: E402,F401  (imports triton now, while TRITON_INTERPRET=1)

_MODELS = str(Path(__file__).resolve().parents[1] / "models")
if _MODELS not in sys.path:
    sys.path.insert(0, _MODELS)


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def interpreted(monkeypatch):
    """Run the kernel ops' Triton code through the interpreter in this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
