"""Shared plumbing of the kernels: optional Triton import, path choice, launching.

Why a launch helper: Triton decides between compiling and interpreting when a function is
*decorated* (``TRITON_INTERPRET`` read at import time). If anything imported this package before
the test session set ``TRITON_INTERPRET=1``, the kernels are compiled ``JITFunction``s that
cannot run on CPU tensors. ``kernel_for`` re-wraps the same Python function as an
``InterpretedFunction`` (or back as a ``JITFunction``) according to the variable at *launch*
time, so import order never matters.
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


def should_use_triton(tensor: torch.Tensor, use_triton: bool | None) -> bool:
    """The dispatch rule shared by every op.

    None (default): Triton for CUDA tensors, and for CPU tensors only under the interpreter.
    True forces Triton (error if impossible), False forces the PyTorch reference.
    """
    possible = HAS_TRITON and (tensor.is_cuda or interpreting())
    if use_triton is None:
        return possible
    if use_triton and not possible:
        why = "Triton is not installed" if not HAS_TRITON else f"tensors are on {tensor.device}"
        raise ValueError(
            f"use_triton=True but the Triton path cannot run here ({why}); pass CUDA tensors, set "
            "TRITON_INTERPRET=1 to interpret on the CPU, or use use_triton=None/False"
        )
    return bool(use_triton)


_rewrapped: dict = {}


def kernel_for(kernel):
    """The launchable form of a ``@jit`` kernel under the current ``TRITON_INTERPRET`` setting."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    want_interpreted = interpreting()
    if isinstance(kernel, InterpretedFunction) == want_interpreted:
        return kernel
    key = (kernel.fn, want_interpreted)
    if key not in _rewrapped:
        _rewrapped[key] = InterpretedFunction(kernel.fn) if want_interpreted else JITFunction(kernel.fn)
    return _rewrapped[key]


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for row-reduction kernels (SM count on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4  # interpreter: few programs, each looping over rows


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
