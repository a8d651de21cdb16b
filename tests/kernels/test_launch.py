"""FastLaunch (kernels/_triton.py): which calls reuse a compiled kernel and what its launcher gets.

On the CPU the Triton launch machinery cannot run (no driver), so a stand-in kernel with
Triton's interface records what reaches Triton and what reaches the compiled launcher; on a GPU
the real kernels are checked against Triton's own launch path.
"""

import pytest
import torch

from velotune.kernels import _triton
from velotune.kernels._triton import FastLaunch


class _Param:
    def __init__(self, is_constexpr):
        self.is_constexpr = is_constexpr


class _Compiled:
    def __init__(self, calls, n):
        self.function, self.packed_metadata = f"function{n}", f"metadata{n}"
        self.run = lambda *args: calls.append(("launcher", args))


class _Kernel:
    """Triton's JITFunction interface: X, n, scale, BLOCK (constexpr), FLAG (constexpr)."""

    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]
    params = [_Param(False), _Param(False), _Param(False), _Param(True), _Param(True)]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            return _Compiled(self.calls, len(self.calls))

        return run


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setattr(_triton, "_launch_hooked", lambda: False)
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    fast._device, fast._stream = (lambda: 0), (lambda device: 1234)
    return kernel, fast


def test_second_call_goes_to_the_compiled_launcher_with_triton_arguments(launch):
    kernel, fast = launch
    x = torch.zeros(64)
    fast[(3,)](x, 32, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    fast[(5, 2)](x, 48, 0.25, BLOCK=16, FLAG=True, num_warps=4)  # same specialization: 48 % 16 == 0
    assert [c[0] for c in kernel.calls] == ["triton", "launcher"]
    assert kernel.calls[1][1] == (5, 2, 1, 1234, "function1", "metadata1", None, None, None, x, 48, 0.25, 16, True)


@pytest.mark.parametrize("change", ["alignment", "divisibility", "one", "dtype", "constexpr", "option", "bool"])
def test_a_new_specialization_goes_through_triton(launch, change):
    kernel, fast = launch
    x = torch.zeros(64)
    fast[(1,)](x, 32, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    args, meta = [x, 32, 0.5], dict(BLOCK=16, FLAG=True, num_warps=4)
    if change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "divisibility":
        args[1] = 33
    elif change == "one":
        args[1] = 1
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        meta["BLOCK"] = 32
    elif change == "option":
        meta["num_warps"] = 8
    else:
        meta["FLAG"] = False
    fast[(1,)](*args, **meta)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    fast[(1,)](*args, **meta)
    assert kernel.calls[-1][0] == "launcher"


def test_defaults_left_unbound_and_hooks_keep_tritons_path(launch, monkeypatch):
    kernel, fast = launch
    x = torch.zeros(64)
    for _ in range(2):
        fast[(1,)](x, 32, 0.5, BLOCK=16)  # FLAG left to a default: Triton binds it every time
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    monkeypatch.setattr(_triton, "_launch_hooked", lambda: True)
    for _ in range(2):
        fast[(1,)](x, 32, 0.5, BLOCK=16, FLAG=True)
    assert [c[0] for c in kernel.calls] == ["triton"] * 4


def test_switch_and_version_gate(monkeypatch):
    monkeypatch.setattr(_triton, "_fast_launch_supported", lambda: True)
    monkeypatch.setattr(_triton, "_fast_launch_wanted", True)
    _triton.set_fast_launch(False)
    assert not _triton.fast_launch_enabled()
    _triton.set_fast_launch(True)
    assert _triton.fast_launch_enabled()
    monkeypatch.setattr(_triton, "_fast_launch_supported", lambda: False)
    assert not _triton.fast_launch_enabled()
    with pytest.raises(TypeError, match="pass True or False"):
        _triton.set_fast_launch("0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_kernels_match_tritons_launch(monkeypatch):
    from velotune.kernels.glu import swiglu
    from velotune.kernels.rms_norm import rms_norm

    torch.manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    g, u = torch.randn(2, 300, 1000, device="cuda", dtype=torch.bfloat16)
    results = {}
    monkeypatch.setattr(_triton, "_fast_launch_wanted", True)
    for flag in ("0", "1"):
        _triton.set_fast_launch(flag == "1")
        # x[1:]: a view starting one row (8 KB) in, so another tensor under the same specialization
        results[flag] = [(rms_norm(x, w, 1e-5), swiglu(g, u), rms_norm(x[1:], w, 1e-5)) for _ in range(3)]
    for fast_run in results["1"]:
        for got, want in zip(fast_run, results["0"][0]):
            assert torch.equal(got, want)
    assert any(launch.compiled for launch in _triton._FAST_LAUNCHES.values())
