"""FSDP2 on velotune's model classes (issue 19 item 4's FSDP2 half, as far as it goes today): `fully_shard`
per decoder layer trains the LoRA model with the offloading checkpoint exactly as unsharded training does
(gloo, 2 CPU processes, each half the batch), on the fast path (whose step plan then resolves each layer's
projections inside the layer's call, after FSDP2's hook gathered its weights). The plain path sharded is
test_fsdp2_trainer.py's (the CPU's default path), so it is not launched a second time here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run(folder, out, nproc: int | None, fast: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    done = subprocess.run([sys.executable, *launcher, str(HERE / "fsdp2_worker.py"), "--folder", str(folder),
                           "--out", str(out), *(["--fast"] if fast else [])], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_fully_shard_per_decoder_layer_equals_unsharded_training(ddp_tiny_dir, tmp_path):
    run(ddp_tiny_dir, tmp_path, nproc=2, fast=True)
    run(ddp_tiny_dir, tmp_path, nproc=None, fast=True)
    sharded, whole = (json.loads((tmp_path / f"fsdp2-{n}.json").read_text()) for n in (2, 1))
    assert sharded["fast"] is whole["fast"] is True and sharded["checkpoint"] == "offload"
    assert sharded["per_layer"] is True and whole["per_layer"] is False  # sharded: projections resolved per layer
    assert sharded["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert whole["losses"][0] != whole["losses"][-1]
    assert sharded["adapter"].keys() == whole["adapter"].keys() and whole["adapter"]
    for name, values in whole["adapter"].items():
        assert sharded["adapter"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
