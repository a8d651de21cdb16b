"""Device and precision choices, made in one place so every entry point agrees."""

from __future__ import annotations

import torch

from .launch import process_device


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_bfloat16_supported() -> bool:
    """Whether bf16 mixed-precision training runs here: on CUDA when the GPU has bf16 units (Ampere
    and newer).

    False on the CPU: transformers' `TrainingArguments(bf16=True)` refuses a machine without a GPU
    (unless `use_cpu=True`), while `fp16=True` is accepted there, so the docs'
    `fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported()` runs as written on a CPU.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return False


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """dtype=None: bf16 on GPUs that have it, else fp16 on GPU, fp32 on the CPU."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} is not known; use one of {sorted(names)} or a torch.dtype")
        dtype = names[dtype]
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype=torch.bfloat16 but this GPU has no bf16 support; use torch.float16 or dtype=None")
    return dtype


def resolve_device(device_map) -> torch.device:
    """device_map as a single device: 'auto'/'sequential'/None -> the default device. Under torchrun /
    accelerate launch: this rank's own GPU (launch.py says why, and refuses maps that do not fit)."""
    placed = process_device(device_map)
    if placed is not None:
        return placed
    if device_map in (None, "auto", "sequential", "balanced"):
        return default_device()
    if isinstance(device_map, dict):
        targets = set(device_map.values())
        if len(targets) != 1:
            raise ValueError(
                f"device_map spreads the model over {sorted(map(str, targets))}; velotune places a model on one "
                "device per process (use accelerate/torchrun for several GPUs)"
            )
        device_map = targets.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s layers run: its `device` (our causal LMs name the layers' device: their first parameter, the
    input embedding, may wait in host memory while training, fast/host_embedding.py), else its first parameter's."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device
