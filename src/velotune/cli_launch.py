"""`velotune train CONFIG.yaml --nproc N`: the same command as N data-parallel processes under torchrun.

Why torchrun and not processes of our own: PyTorch's launcher already does the rendezvous, sets
each process's RANK / LOCAL_RANK / WORLD_SIZE (which launch.py reads to put each copy of the model on
its own GPU), and when one process fails it stops the others and names the failing rank, instead of
leaving them waiting in a collective. The command prints the exact torchrun line it runs, so a user
can run it themselves (or adapt it, e.g. for a cluster's scheduler); `--nnodes` with a rendezvous
endpoint spans several machines (README, "Many GPUs").
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from .cli_checks import ConfigError


def launch_command(config_path: str | None, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                   rdzv_id: str | None = None, python: str | None = None) -> list[str]:
    """The torchrun command line (as `python -m torch.distributed.run`, the same program) that runs
    `velotune train CONFIG` in `nproc` processes on this machine, on `nnodes` machines in all."""
    command = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        command += ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        command += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    command += ["-m", "velotune.cli", "train"]
    return command + ([str(config_path)] if config_path is not None else [])


def check_request(nproc: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str | None, gpus: int) -> None:
    """Errors before anything starts: a count below one, more processes than GPUs (both numbers named),
    several machines without a rendezvous point."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc {nproc}: the number of processes per machine must be 1 or more")
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ConfigError(f"--nnodes {nnodes}: the number of machines must be 1 or more")
    if gpus and nproc > gpus:
        raise ConfigError(f"--nproc {nproc} asks for more processes than this machine has GPUs ({gpus}): DDP runs one "
                          f"process per GPU. Use --nproc {gpus} (or fewer)")
    if nnodes > 1 and not (rdzv_endpoint and rdzv_id):
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (a machine every node reaches) and "
                          "--rdzv-id ID (the same on every node), so the machines find one another")


def launch_training(config_path: str | None, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                    rdzv_id: str | None = None) -> Path | None:
    """Run the torchrun line and wait; the adapter folder when every process succeeded, else None
    (torchrun has then printed which rank failed and its error)."""
    import torch

    from .cli import load_config

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_request(nproc, nnodes, rdzv_endpoint, rdzv_id, gpus)
    config = load_config(config_path)  # a config mistake is reported once, here, not by every rank
    command = launch_command(config_path, nproc, nnodes, rdzv_endpoint, rdzv_id)
    where = f"{nproc} GPU(s)" if gpus else f"{nproc} CPU processes (gloo backend; no GPU here)"
    scope = "this machine" if nnodes == 1 else f"this machine, one of {nnodes}"
    mode = "sharded (FSDP2)" if config["training"].get("fsdp") else "data-parallel (DDP)"
    print(f"velotune: training {mode} on {where} of {scope}; launching:\n  {shlex.join(command)}", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        print(f"velotune: the launched training failed (exit code {done.returncode}); the first failing rank's "
              "error is above", file=sys.stderr)
        return None
    return Path(config["training"]["output_dir"]) / "lora_model"
