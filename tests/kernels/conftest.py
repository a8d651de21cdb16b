"""Kernel tests run the Triton path everywhere: compiled on CUDA, interpreted on the CPU.

On a machine without CUDA this sets ``TRITON_INTERPRET=1`` for the session before any test module
imports triton (importing torch does not import triton; checked with torch 2.13 / triton 3.9).
Should something have imported ``velotune.kernels`` earlier in the session (other tests, once the
model uses the kernels), the launch helper ``velotune.kernels._triton.kernel_for`` re-wraps each
kernel for the interpreter at launch time, so the order does not matter. With CUDA the variable is
left alone: the same tests then exercise the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="the Triton path needs triton installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
