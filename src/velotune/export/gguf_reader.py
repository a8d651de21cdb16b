"""Read a GGUF file we wrote back into a transformers-layout model, for the export check when
llama.cpp is not installed: every tensor is dequantized with our `dequantize`, converted back
from llama.cpp's layout, and loaded into a fresh model of the trained model's class."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from . import quants
from .gguf_arch import TensorNamer
from .gguf_layout import read_layout
from .weights import is_tied, plan_tensors


def read_tensor(data: np.ndarray, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor's file bytes as float32 of `shape` (transformers' row-major order)."""
    return quants.dequantize(np.asarray(data), qtype, shape).float().reshape(shape)


@torch.no_grad()
def model_from_gguf(path: Path, like) -> torch.nn.Module:
    """A float32 CPU model of `like`'s class holding the weights stored in `path`."""
    namer = TensorNamer(like.config)
    by_gguf = {}
    for plan in plan_tensors(like):
        name = namer.name(plan.name)
        if name is not None:
            by_gguf[name] = plan
    config = copy.deepcopy(like.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = type(like)(config).float().eval()
    state = {}
    layout = read_layout(path)  # names a truncated file as such
    for tensor in layout.tensors:
        plan = by_gguf.get(tensor.name)
        if plan is not None:
            state[plan.name] = namer.revert(plan.name, read_tensor(layout.data(tensor), tensor.qtype, plan.shape))
    missing = set(by_gguf.values()) - {p for p in by_gguf.values() if p.name in state}
    if missing:
        raise ValueError(f"{path} lacks tensors the model needs, e.g. {[p.name for p in missing][:3]}")
    result = model.load_state_dict(state, strict=False)
    head_optional = is_tied(like) or namer.spec.gguf.tied_output
    absent = [k for k in result.missing_keys if not (k == "lm_head.weight" and head_optional)]
    if absent:
        raise ValueError(f"{path}: weights missing after loading: {absent[:5]}")
    if "lm_head.weight" in result.missing_keys:
        model.lm_head.weight = model.get_input_embeddings().weight
    return model
