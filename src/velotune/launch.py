"""Where this process stands in a multi-process launch (torchrun, `accelerate launch`), and its device.

Why a module of its own, at the bottom of the package: loading (`from_pretrained`), the trainer and
the command line must agree on one thing before any of them touches a GPU: under a launcher, each
process is one data-parallel replica that holds a whole copy of the model on *its own* GPU
(`cuda:LOCAL_RANK`). Without this, every rank's `from_pretrained` put its copy on `cuda:0`.

The launchers describe the process through environment variables (torchrun and accelerate both
set them): WORLD_SIZE (processes in the job, all nodes), RANK (this one's global index),
LOCAL_RANK / LOCAL_WORLD_SIZE (index and count on this machine). Nothing here starts a process
group; transformers' `TrainingArguments` does that (gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

# device_map values that mean "spread one model over the GPUs" in transformers / accelerate.
SPREADING_MAPS = ("auto", "balanced", "balanced_low_0")


@dataclass(frozen=True)
class Launch:
    """This process in its launch: 1/0/0/1 for a plain `python train.py`."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The process that writes the run's outputs (global rank 0)."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (the launcher sets it: "
                         "torchrun or accelerate launch)") from None


def current() -> Launch:
    """The launch described by the environment (read each call: tests and launchers set it)."""
    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local_rank = _int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < max(world, 1) or not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                         f"LOCAL_WORLD_SIZE={local_world}; start the processes with torchrun or accelerate launch")
    return Launch(world, rank, local_rank, local_world)


def check_gpu_count(launch: Launch | None = None, gpus: int | None = None) -> None:
    """More processes on this machine than GPUs: an error naming both numbers (CUDA runs only; a CPU
    launch with the gloo backend, as the tests use, has no such limit)."""
    launch = launch or current()
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus and launch.local_world_size > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(
            f"{launch.local_world_size} processes were launched on this machine but it has {gpus} GPU(s){where}: "
            f"data-parallel training runs one process per GPU. Launch with --nproc_per_node {gpus} (or fewer)")


def process_device(device_map, launch: Launch | None = None) -> torch.device | None:
    """The device of this rank's model copy under a multi-process launch, or None outside one (the
    caller's usual rules apply). Errors: a map that spreads one model over GPUs, a GPU that is
    another rank's, more processes than GPUs."""
    launch = launch or current()
    if not launch.distributed:
        return None
    if isinstance(device_map, str) and device_map in SPREADING_MAPS:
        raise ValueError(
            f"device_map={device_map!r} spreads one model over several GPUs, but this process is rank {launch.rank} "
            f"of a {launch.world_size}-process launch (torchrun / accelerate launch), where every process holds a "
            "whole copy of the model on its own GPU (data parallel: DDP, or FSDP2 with fsdp=True, which then keeps "
            "only its shard of that copy). Choose one of the two: (1) keep the launcher "
            "and drop device_map (each rank then loads onto cuda:LOCAL_RANK), or pass "
            "device_map={'': int(os.environ['LOCAL_RANK'])}; (2) run a single process (plain `python train.py`, "
            "no launcher) when one copy of the model is to be spread over the GPUs")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    check_gpu_count(launch)
    own = torch.device("cuda", launch.local_rank)
    # The current device too, as every DDP script does first: Triton kernels, the offloading
    # checkpoint's side stream and bare "cuda" tensors then land on this rank's GPU, not on cuda:0.
    torch.cuda.set_device(own)
    if device_map in (None, "sequential"):  # from_pretrained's default: this rank's GPU
        return own
    targets = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    devices = {torch.device("cuda", t) if isinstance(t, int) else torch.device(t) for t in targets}
    devices = {own if d.type == "cuda" and d.index is None else d for d in devices}  # "cuda": this rank's GPU
    if devices == {torch.device("cpu")}:
        return torch.device("cpu")
    if devices != {own}:
        raise ValueError(
            f"device_map={device_map!r} puts rank {launch.rank}'s copy of the model on "
            f"{', '.join(sorted(map(str, devices)))}, but under the launcher this process trains on {own} "
            f"(LOCAL_RANK={launch.local_rank}); drop device_map, or pass device_map={{'': {launch.local_rank}}}")
    return own


def quiet_replicas(launch: Launch | None = None) -> None:
    """On ranks other than 0, velotune's logger keeps warnings only (each message once per job, from
    rank 0), unless the application set a level itself."""
    launch = launch or current()
    logger = logging.getLogger("velotune")
    if launch.distributed and not launch.main and logger.level in (logging.NOTSET, logging.INFO):
        logger.setLevel(logging.WARNING)
