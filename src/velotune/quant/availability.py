"""Can 4-bit (NF4) layers run on a device here? Answered by trying, not by guessing.

bitsandbytes' support differs by version, build and device (CUDA kernels, CPU paths since 0.45,
an optional AVX512-BF16 kernel, ROCm/XPU builds), so the only reliable test is a tiny layer:
quantize it with our code, run bitsandbytes' ``Linear4bit.forward`` and compare with the
dequantized reference. The answer is cached per device.
"""

from __future__ import annotations

import functools

import torch

_MIN_BNB = (0, 45)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def _check(device: str) -> tuple[bool, str]:
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a broken native library at import time
        return False, f"bitsandbytes is not importable ({type(exc).__name__}: {exc}); install bitsandbytes>=0.45"
    version = getattr(bitsandbytes, "__version__", "0")
    if _version_tuple(version) < _MIN_BNB:
        return False, f"bitsandbytes {version} is too old for 4-bit on {device}; need >= 0.45"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    if dev.type == "meta":
        return False, "the meta device holds no data"
    try:
        from torch import nn

        from velotune.quant.linear import to_linear4bit
        from velotune.quant.nf4 import dequantize_nf4_state

        gen = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 8, bias=False, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(8, 64, generator=gen))
        layer = to_linear4bit(linear.to(dev), torch.float32)
        x = torch.randn(3, 64, generator=gen).to(dev)
        with torch.no_grad():
            got = layer(x)
            ref = torch.nn.functional.linear(x, dequantize_nf4_state(layer.weight.data, layer.weight.quant_state))
        _release_workspaces(dev)
        if not torch.allclose(got.float(), ref, atol=1e-3, rtol=1e-3):
            return False, f"bitsandbytes {version}'s 4-bit matmul on {device} gives wrong results"
    except Exception as exc:
        return False, f"bitsandbytes {version} cannot run a 4-bit layer on {device} ({type(exc).__name__}: {exc})"
    return True, f"NF4 4-bit layers run on {device} (bitsandbytes {version})"


def _release_workspaces(dev: torch.device) -> None:
    """Give back the cuBLAS workspaces the probe's products made. Session 17's snapshot of a Qwen2.5-VL-7B QLoRA
    load (BENCHMARKS.md) has the probe's call holding a 32 MiB block at the load's peak, and that row stays 32 MiB
    above Unsloth's after loading; a workspace the training's products need comes back at their first call. (The
    probe also has no bias, so it makes no biased product, which takes cuBLASLt's path and its own workspace.)"""
    if dev.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch.cuda.synchronize(dev)
        torch._C._cuda_clearCublasWorkspaces()


def nf4_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(True, description) when NF4 ``Linear4bit`` layers run on ``device``, else (False, reason).

    The reason is meant for the user, e.g. to explain falling back to 16-bit weights.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return _check(str(dev))
