"""Kernel tests run the Triton path everywhere: compiled on CUDA, interpreted on the CPU.

On a machine without CUDA, ``TRITON_INTERPRET=1`` must be set before triton is first imported
(Triton decorates its own ``tl.sum`` etc. at import). ``tests/conftest.py`` sets it at its top,
before any test module is imported (importing torch does not import triton: torch 2.13 / triton
3.9); this file repeats it for runs rooted at tests/kernels, and stops with a clear message if
triton was imported in compiled mode anyway. With CUDA the variable is left alone: the same tests
then exercise the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton path needs triton installed")

if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ["TRITON_INTERPRET"] != "1" or not isinstance(triton.language.standard.sum, InterpretedFunction):
        raise pytest.UsageError(
            "kernel tests on a CPU need Triton's interpreter: run with TRITON_INTERPRET=1 set before "
            "triton is imported (tests/conftest.py does this unless the variable is already set otherwise)"
        )

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
