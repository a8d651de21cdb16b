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

import functools
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
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``), read at each call.

    ``TRITON_INTERPRET`` is Triton's own switch, so Triton's own parser answers (``triton.knobs``,
    Triton >= 3.4: 1/true/yes/on/y), never a second one of ours that could disagree with it."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton < 3.4 read the variable with os.environ, "1" meaning on
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


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
    """The kernel to launch as ``kernel_for(k)[grid](*args, **meta)``: a compiled kernel comes
    wrapped in its `FastLaunch` (unless `set_fast_launch(False)`, which ``VELOTUNE_TRITON_FAST_LAUNCH=0``
    asks for); raises a clear error if the interpreter was requested too late."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if interpreting() and not interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so the kernels were compiled for "
            "a GPU; set TRITON_INTERPRET=1 in the environment before importing triton/velotune "
            "(the test suite does so in tests/conftest.py)"
        )
    if interpreted or not fast_launch_enabled():
        return kernel
    fast = _FAST_LAUNCHES.get(id(kernel))
    if fast is None:
        fast = _FAST_LAUNCHES[id(kernel)] = FastLaunch(kernel)
    return fast


# Triton versions whose launch internals FastLaunch was written against (3.6: the GPU machine's,
# 3.9: the CPU machines'); others keep Triton's own launch path.
_FAST_LAUNCH_VERSIONS = ((3, 6), (3, 10))
_FAST_LAUNCHES: dict[int, "FastLaunch"] = {}
# Whether FastLaunch is wanted. kernels/ imports nothing from velotune, so it does not read the
# environment switch (VELOTUNE_TRITON_FAST_LAUNCH) itself: velotune.settings parses it and whoever
# plans the work pushes the answer here with set_fast_launch (the package at import, the step plan
# at each step). A flag, not a read per launch: `kernel_for` runs at every launch of a small model.
_fast_launch_wanted = True


def set_fast_launch(enabled: bool) -> None:
    """Launch compiled kernels through `FastLaunch` (True, the default) or Triton's own launcher."""
    global _fast_launch_wanted
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_launch(enabled={enabled!r}): pass True or False")
    _fast_launch_wanted = enabled


def fast_launch_enabled() -> bool:
    return _fast_launch_wanted and _fast_launch_supported()


@functools.cache
def _fast_launch_supported() -> bool:
    if not HAS_TRITON:
        return False
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    low, high = _FAST_LAUNCH_VERSIONS
    return low <= version < high


def _spec(arg):
    """What Triton's specialization can depend on for a non-constexpr argument, or finer: a
    tensor's dtype and 16-byte alignment, an integer's divisibility by 16, equality to 1 and
    width, a bool's or other object's value; floats are never specialized."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return float if isinstance(arg, float) else (type(arg), arg)
    return int, arg % 16 == 0, arg == 1, -(2**31) <= arg < 2**31, arg < 2**63


def _launch_hooked() -> bool:
    """True when a Triton launch hook is registered (a profiler such as proton wants every launch)."""
    hook = getattr(triton.knobs.runtime, "launch_enter_hook", None) if hasattr(triton, "knobs") else None
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """``kernel[grid](*args, **meta)`` for a compiled Triton kernel, without Triton's per-call work.

    Why: on a small model's training step the host, not the GPU, sets the pace, and Triton's
    generic launch (binding the arguments to the signature, reading its environment knobs,
    building launch metadata for hooks, checking the kernel's globals) costs tens of microseconds
    per call, a few thousand times per step. The first call of each specialization goes through
    Triton (which compiles or finds the kernel) and the compiled kernel is kept under a key at
    least as fine as Triton's own (see `_spec`; plus the constexprs, the launch options and the
    device); later calls with that key hand the compiled kernel's launcher the same arguments
    Triton would. A registered launch hook sends every call through Triton again.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)  # every parameter, in signature order
        self.constexpr = tuple(bool(p.is_constexpr) for p in kernel.params)
        self.compiled: dict[tuple, tuple] = {}
        self._device = self._stream = None  # the driver's current device/stream getters, bound at first launch

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta):
        if self._device is None:
            from triton.runtime.driver import driver

            self._device, self._stream = driver.active.get_current_device, driver.active.get_current_stream
        device = self._device()
        key = (device, *(("constexpr", a) if c else _spec(a) for a, c in zip(args, self.constexpr)), *meta.items())
        entry = self.compiled.get(key)
        if entry is None or _launch_hooked():
            self._first_launch(key, grid, args, meta)
            return
        run, function, metadata, tail = entry
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream(device), function, metadata,
            None, None, None, *args, *tail)  # fmt: skip

    def _first_launch(self, key, grid, args, meta) -> None:
        compiled = self.kernel[grid](*args, **meta)
        rest = self.names[len(args):]
        if compiled is None or _launch_hooked() or not all(name in meta for name in rest):
            return  # parameters left to their defaults: keep Triton's binding for this key
        self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, tuple(meta[n] for n in rest))


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for row-reduction kernels (SM count on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4  # interpreter: few programs, each looping over rows


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
