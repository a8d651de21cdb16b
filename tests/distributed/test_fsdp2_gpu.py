"""FSDP2 through velotune's SFTTrainer on two GPUs (NCCL), the fast path as it turns on by itself on CUDA
(issue 19 item 2): LoRA and full fine-tuning sharded over 2 GPUs train like 1 GPU with the same global
batch, distributed checkpoints resume on 2 and on 1, consolidation; bf16 weights with the mixed-precision
policy (bf16 compute, fp32 reduction) stay within bf16 tolerance of the fp32 run; a model loaded into host
memory is sharded onto the GPUs by the trainer. Needs 2 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def launch(*worker_args, nproc: int | None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    if not nproc:  # one process sees one GPU: with two, transformers' Trainer would wrap in DataParallel (TRL refuses)
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    done = subprocess.run([sys.executable, *launcher, str(HERE / "fsdp_trainer_worker.py"), *map(str, worker_args)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def result(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"result-{rank}.json").read_text())


@pytest.fixture(scope="module")
def gpu_runs(ddp_tiny_dir, tmp_path_factory):
    sharded, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    launch("--folder", ddp_tiny_dir, "--out", sharded, "--cuda", nproc=2)
    launch("--folder", ddp_tiny_dir, "--out", one, "--references", sharded, "--cuda", nproc=None)
    return sharded, one


def test_two_gpus_sharded_train_like_one(gpu_runs, ddp_tiny_dir, tmp_path):
    sharded, one = gpu_runs
    bf16 = tmp_path / "bf16"
    launch("--folder", ddp_tiny_dir, "--out", bf16, "--cuda", "--bf16", nproc=2)
    for kind in ("lora", "full"):
        ranks, reference = [result(sharded / kind, r) for r in (0, 1)], result(one / kind)
        assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
        assert all(r["wrapped"] == "ShardedModel" and r["state_local"] * 2 == r["state_full"] for r in ranks)
        # fp32 weights, but Triton's fp32 dots may use TF32 and the batches pad differently: 1e-3, not 1e-5.
        assert ranks[0]["losses"] == pytest.approx(reference["losses"], rel=1e-3)
        for resumed in (sharded / kind / "resumed", one / kind / "resumed1"):
            assert result(resumed)["losses"] == pytest.approx(ranks[0]["losses"], rel=1e-3)
        assert (one / kind / "consolidated").is_dir()
        assert result(bf16 / kind)["losses"] == pytest.approx(reference["losses"], rel=3e-2)
    assert result(sharded / "lora")["fast"] and result(sharded / "lora")["per_layer"]


def test_a_model_loaded_into_host_memory_is_sharded_onto_the_gpus(gpu_runs, ddp_tiny_dir, tmp_path):
    """from_pretrained(device_map="cpu") under the launcher: the trainer does not move the whole model to a GPU;
    FSDP2 moves each rank's shards there, layer by layer (how a model too big for one GPU gets onto several)."""
    _, one = gpu_runs
    host = tmp_path / "host"
    launch("--folder", ddp_tiny_dir, "--out", host, "--cuda", "--cpu-load", nproc=2)
    for kind in ("lora", "full"):
        ranks = [result(host / kind, r) for r in (0, 1)]
        assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
        assert ranks[0]["losses"] == pytest.approx(result(one / kind)["losses"], rel=1e-3)
