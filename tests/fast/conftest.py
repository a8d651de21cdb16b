"""The fast-path tests reuse the parity suite's tiny family configs (tests/tiny/families.py).

The kernel ops run their Triton code only in tests that ask for it with the `kernel_device`
fixture: on a CPU machine through Triton's interpreter (tests/conftest.py turns it on for the
whole session, before triton is imported), on a CUDA machine compiled, on CUDA tensors. The
interpreter cannot be turned on there: triton was imported in compiled mode, and a compiled
kernel given CPU tensors fails. Elsewhere the ops' CPU path is their PyTorch reference (the
interpreter costs seconds per model step; tests/kernels/ check each kernel against it).
"""

import pytest
import torch

import velotune.kernels  # noqa: E402,F401  (imports triton now, while TRITON_INTERPRET=1)


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def kernel_device(monkeypatch) -> str:
    """The device on which this test's model runs the kernel ops' Triton code: "cuda" (compiled
    kernels; TF32 off so fp32 stays fp32) or, without CUDA, "cpu" under Triton's interpreter."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
