"""Read checkpoint weights shard by shard (safetensors or PyTorch .bin, sharded or not).

Shards are yielded one at a time so a loader holds at most one shard beside the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_files(folder: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    loose = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if loose:
        return loose
    raise FileNotFoundError(
        f"no weights in {folder}: looked for model.safetensors(.index.json), pytorch_model.bin(.index.json), "
        "*.safetensors and *.bin"
    )


def safetensors_size(file: Path) -> int | None:
    """The size `file`'s safetensors header promises (None when the header itself is unreadable)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _read(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors":
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as error:
            raise ValueError(f"cannot read {file}: {str(error).splitlines()[0]}. The file is damaged or was cut "
                             "short (interrupted download or copy, full disk); download or save it again.") from error
    actual = file.stat().st_size
    expected = safetensors_size(file)
    if expected is None or actual < expected:
        said = f"its header describes {expected:,} bytes, the file has {actual:,}" if expected else \
            f"its header is unreadable ({actual:,} bytes)"
        raise ValueError(f"{file} is truncated or damaged: {said}. It was cut short (interrupted download or "
                         "copy, full disk); download or save it again.")
    try:
        return load_file(str(file))
    except Exception as error:  # safetensors raises its own error type for damaged headers
        raise ValueError(f"cannot read {file}: {error}. The file is damaged; download or save it again.") from error


def check_finite(tensors: dict[str, torch.Tensor], file: Path, why: str | None = None) -> None:
    """Refuse NaN/inf weights (flipped bytes, a diverged save) by name, before anything computes with them.
    One float64 sum per tensor (no mask the size of the tensor); only a non-finite sum is looked into.
    `why` replaces the explanation (fast_language_model.py: values that overflow float16 when the
    weights are cast)."""
    for name, value in tensors.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value.sum(dtype=torch.float64))):
            bad = (~torch.isfinite(value)).nonzero()
            if len(bad):
                where = tuple(int(i) for i in bad[0])
                raise ValueError(
                    f"{file}: tensor {name!r} holds {len(bad):,} NaN/inf values (first at index {where}); " + (why or
                    "the file is damaged or was saved from a diverged model. Download or save it again."))


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """One checkpoint file's tensors, refused by name when truncated, unreadable or not finite."""
    tensors = _read(file)
    check_finite(tensors, file)
    return tensors


def iter_shards(folder: Path) -> Iterator[dict[str, torch.Tensor]]:
    for file in checkpoint_files(folder):
        yield read_shard(file)  # no local reference: the caller alone decides when a shard is freed
