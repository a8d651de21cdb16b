"""Kernel tests run the Triton path everywhere: compiled on CUDA, interpreted on the CPU.

On a machine without CUDA, ``TRITON_INTERPRET=1`` must be set before triton is first imported
(Triton decorates its own ``tl.sum`` etc. at import). ``tests/conftest.py`` sets it at its top,
before any test module is imported (importing torch does not import triton: torch 2.13 / triton
3.9); this file repeats it for runs rooted at tests/kernels, and fails each kernel test with a
clear message if triton was imported in compiled mode anyway. With CUDA the variable is left
alone: the same tests then exercise the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton path needs triton installed")


def _interpreter_problem() -> str | None:
    """Why the Triton path cannot run on this CPU-only machine, or None when it can."""
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(triton.language.sum, InterpretedFunction):
        return (
            "kernel tests on a CPU need Triton's interpreter: TRITON_INTERPRET=1 must be set before triton is "
            "first imported (tests/conftest.py does this unless the variable was already set to something else)"
        )
    return None


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_interpreter_check():
    problem = _interpreter_problem()
    if problem is not None:
        pytest.fail(problem)  # fail these tests loudly, leave the rest of the session alone
    torch.manual_seed(0)
