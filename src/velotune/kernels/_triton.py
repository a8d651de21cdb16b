"""Shared plumbing of the kernels: optional Triton import, path choice, launching.

Interpreter (``TRITON_INTERPRET=1``, how CI runs the Triton path on the CPU): Triton decides
between compiling and interpreting when a function is *decorated*, and its own library
(``tl.sum``, ``tl.max``, ...) is decorated when ``triton`` is first imported. So the variable
must be set before the first ``import triton`` in the process; setting it later cannot be undone
by re-wrapping our kernels (we tried: ``tl.sum`` then refuses to run). The test suite sets it at
the top of ``tests/conftest.py`` (CPU machines only), before anything imports triton; importing
torch does not import triton (torch 2.13 / triton 3.9). ``kernel_for`` turns a late setting into a
clear error instead of Triton's "Cannot call @triton.jit'd outside of the scope of a kernel".
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS/Windows wheels of torch without triton: reference paths only
    triton = None
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for ``triton.language`` so the kernel files still import (annotations only)."""

        constexpr = object

        def __getattr__(self, name):
            raise RuntimeError("Triton is not installed: `pip install triton` (Linux) or call with use_triton=False")

    tl = _NoTriton()


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``), read at each call."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _probe(X):  # never launched: its decorated type says how @jit built this process's kernels
    pass


_PROBE = jit(_probe)


def interpreter_active() -> bool:
    """True when CPU tensors can run the kernels: TRITON_INTERPRET=1 now *and* when triton and our
    kernels were decorated (a later setting leaves them compiled for a GPU)."""
    if not (HAS_TRITON and interpreting()):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_PROBE, InterpretedFunction)


def should_use_triton(tensor: torch.Tensor, use_triton: bool | None) -> bool:
    """The dispatch rule shared by every op.

    None (default): Triton for CUDA tensors, and for CPU tensors only when the interpreter is
    really active (`interpreter_active`): a compiled kernel is never handed CPU tensors, and a
    TRITON_INTERPRET=1 set after triton's import (e.g. on a CUDA machine) leaves CPU tensors on the
    reference. True forces Triton (error if impossible; `kernel_for` explains a late
    TRITON_INTERPRET), False forces the PyTorch reference.
    """
    if use_triton is None:
        return HAS_TRITON and (tensor.is_cuda or interpreter_active())
    possible = HAS_TRITON and (tensor.is_cuda or interpreting())
    if use_triton and not possible:
        why = "Triton is not installed" if not HAS_TRITON else f"tensors are on {tensor.device}"
        raise ValueError(
            f"use_triton=True but the Triton path cannot run here ({why}); pass CUDA tensors, set "
            "TRITON_INTERPRET=1 to interpret on the CPU, or use use_triton=None/False"
        )
    return bool(use_triton)


def kernel_for(kernel):
    """The kernel to launch; raises a clear error if the interpreter was requested too late."""
    from triton.runtime.interpreter import InterpretedFunction

    if interpreting() and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so the kernels were compiled for "
            "a GPU; set TRITON_INTERPRET=1 in the environment before importing triton/velotune "
            "(the test suite does so in tests/conftest.py)"
        )
    return kernel


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for row-reduction kernels (SM count on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4  # interpreter: few programs, each looping over rows


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
