"""Checkpoints of a sharded (FSDP2) run as torch distributed checkpoints, and their consolidation.

Why distributed checkpoints: under FSDP2 no rank holds the whole model or optimizer state, and
gathering them onto rank 0 at every save would need the whole model's memory there (the reason to
shard in the first place). `torch.distributed.checkpoint` (DCP) has every rank write its own shards
plus one metadata file, and a load reshards: a checkpoint written by 2 ranks resumes on 2, on 1 (an
unsharded model) or on 4. A checkpoint folder of such a run holds, beside transformers' trainer state,
scheduler and per-rank RNG files:

    model_dcp/       the weights that train (LoRA: the adapter only; full fine-tuning: every weight)
    optimizer_dcp/   the optimizer state, keyed by parameter name (absent with save_only_model)
    config.json      the model's configuration (and adapter_config.json for LoRA), tokenizer files

Keys are the parameter names of the unwrapped model, whatever the sharding, so any world size reads
them. `consolidate` turns such a folder into an ordinary one (adapter_model.safetensors or
model.safetensors + config) in one process, without a process group and without the base weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("velotune")

MODEL_DIR = "model_dcp"
OPTIMIZER_DIR = "optimizer_dcp"
SCHEDULER_FILE = "scheduler.pt"  # transformers' name: rank 0 writes the learning-rate schedule as usual


def is_dcp_checkpoint(folder) -> bool:
    return folder is not None and (Path(folder) / MODEL_DIR / ".metadata").is_file()


def _single() -> bool:
    """No process group: DCP reads and writes in this one process (said, so it does not warn each time)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _options(model: nn.Module, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only what trains is saved; the frozen base comes from the base model on resume.
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=_is_peft(model), strict=False)


def save(model: nn.Module, optimizer, folder: Path) -> None:
    """Every rank writes its shards of the trainable weights (and of the optimizer state) into `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model, options=_options(model)), checkpoint_id=str(Path(folder) / MODEL_DIR),
             no_dist=_single())
    if optimizer is not None:
        save_optimizer(model, optimizer, folder)


def save_optimizer(model: nn.Module, optimizer, folder: Path) -> None:
    """Every rank writes its shards of the optimizer state, keyed by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(model, optimizer, options=_options(model)),
             checkpoint_id=str(Path(folder) / OPTIMIZER_DIR), no_dist=_single())


def load(model: nn.Module, optimizer, folder: Path) -> None:
    """Read `folder`'s weights (and optimizer state, when an optimizer is given) into this rank's shards:
    the layout they were saved in does not matter (2 ranks -> 1 or 2)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    weights = get_model_state_dict(model, options=_options(model))  # this rank's shapes: the read's targets
    dcp.load(weights, checkpoint_id=str(Path(folder) / MODEL_DIR), no_dist=_single())
    set_model_state_dict(model, weights, options=_options(model))
    if optimizer is not None:
        load_optimizer(model, optimizer, folder)


def load_optimizer(model: nn.Module, optimizer, folder: Path) -> None:
    """Read `folder`'s optimizer state into this rank's optimizer (a warning when it was not saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (Path(folder) / OPTIMIZER_DIR).is_dir():
        logger.warning("velotune: %s has no optimizer state (saved with save_only_model=True): the optimizer "
                       "starts fresh", folder)
        return
    state = get_optimizer_state_dict(model, optimizer, options=_options(model))  # creates the empty state first
    dcp.load(state, checkpoint_id=str(Path(folder) / OPTIMIZER_DIR), no_dist=_single())
    set_optimizer_state_dict(model, optimizer, state, options=_options(model))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable state (LoRA: the adapter; else every weight) gathered onto rank 0's host memory;
    other ranks get {}. Every rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(model, full=True))


def read_full(folder: Path) -> dict[str, torch.Tensor]:
    """A DCP folder's tensors, whole, in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
             for name, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def consolidate(checkpoint, out) -> Path:
    """Write a DCP checkpoint folder of a velotune run as an ordinary folder: a LoRA run's adapter
    (adapter_config.json + adapter_model.safetensors), or a full fine-tune's config + safetensors,
    with the tokenizer. Loads with velotune's from_pretrained and with transformers / PEFT. Runs in one
    process (call it on rank 0 only, or after training) and needs neither the base weights nor a GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if not is_dcp_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a distributed checkpoint of a sharded run (no {MODEL_DIR}/.metadata "
                         "in it); a DDP or one-process checkpoint is already an ordinary folder")
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint} has no config.json: it was not written by velotune's sharded trainer")
    state = read_full(checkpoint / MODEL_DIR)
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):  # the architecture only: save_pretrained writes the given tensors
        model = AutoModelForCausalLM.from_config(config)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftConfig, get_peft_model

        adapter = PeftConfig.from_pretrained(checkpoint)
        base_name = adapter.base_model_name_or_path
        model = get_peft_model(model, adapter)
        model.peft_config["default"].base_model_name_or_path = base_name  # the trained base, not this folder
        missing = [k for k in model.state_dict() if "lora_" in k and k not in state]
        if missing:
            raise ValueError(f"{checkpoint}: the adapter weights {missing[:3]} are missing from {MODEL_DIR}")
    else:
        missing = [k for k in model.state_dict() if k not in state and not _tied(model, k)]
        if missing:
            raise ValueError(f"{checkpoint}: the weights {missing[:3]} are missing from {MODEL_DIR}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state)
    if any(checkpoint.glob("tokenizer*")):
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    logger.info("velotune: consolidated %s into %s", checkpoint, out)
    return out


def _tied(model: nn.Module, key: str) -> bool:
    """An output embedding tied to the input one (saved once, under the input's name)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return tied and key.endswith("lm_head.weight")
