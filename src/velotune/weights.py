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


def iter_shards(folder: Path) -> Iterator[dict[str, torch.Tensor]]:
    for file in checkpoint_files(folder):
        if file.suffix == ".safetensors":
            yield load_file(str(file))
        else:
            yield torch.load(file, map_location="cpu", weights_only=True)
