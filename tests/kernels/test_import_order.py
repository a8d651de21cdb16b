"""The interpreter set-up the kernel tests rely on (see tests/kernels/conftest.py)."""

import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import JITFunction

from velotune.kernels._triton import kernel_for

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter question only arises without CUDA")


@needs_cpu
def test_importing_torch_does_not_import_triton():
    """Why tests/conftest.py may import torch before it sets TRITON_INTERPRET."""
    code = "import sys, torch; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@needs_cpu
def test_compiled_kernel_under_the_interpreter_is_a_clear_error():
    """What a user sees when TRITON_INTERPRET=1 came after triton's import (a compiled JITFunction)."""

    def _kernel(X):
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after triton was imported"):
        kernel_for(JITFunction(_kernel))
