"""A checkpoint folder in several safetensors shards whose boundaries fall inside decoder layers.

Real sharded checkpoints (transformers' `save_pretrained(max_shard_size=...)`) cut wherever the size
limit falls, so a decoder layer is often split over two files; the streaming loader must hold such a
layer until its last tensor arrives. transformers' own sharding cannot be told where to cut, so the
cuts here are placed on purpose: each one between two tensors of the same layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def write_sharded(model, folder: Path, dtype: torch.dtype, shards: int = 3) -> list[list[str]]:
    """Save transformers `model` in `dtype` to `folder` as `shards` files plus the index; return the keys
    of each file. Every cut separates two tensors of one decoder layer."""
    folder = Path(folder)
    model.to(dtype).save_pretrained(folder)
    single = folder / "model.safetensors"
    tensors = load_file(single)
    single.unlink()
    keys = list(tensors)
    order = {k: i for i, k in enumerate(model.state_dict())}  # module order: embeddings, layer 0, 1, ...
    keys.sort(key=lambda k: order.get(k, len(order)))
    cuts = [_cut_inside_layer(keys, len(keys) * i // shards) for i in range(1, shards)]
    groups = [keys[a:b] for a, b in zip([0, *cuts], [*cuts, len(keys)])]
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for group, name in zip(groups, names):
        save_file({k: tensors[k].contiguous() for k in group}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: name for group, name in zip(groups, names) for k in group}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return groups


def _cut_inside_layer(keys: list[str], start: int) -> int:
    """The first position >= start where keys[p - 1] and keys[p] belong to the same decoder layer."""
    for p in range(max(start, 1), len(keys)):
        before, after = _LAYER.match(keys[p - 1]), _LAYER.match(keys[p])
        if before and after and before.group(1) == after.group(1):
            return p
    raise ValueError(f"no cut inside a decoder layer after key {start} of {len(keys)}")
