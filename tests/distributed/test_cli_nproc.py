"""`velotune train CONFIG.yaml --nproc N` (issue 19 item 3): the torchrun line it builds, on one machine and
on several (item 6: what a multi-node run needs, checked as far as one machine allows), its bad input, and a
real two-process run of the command on the CPU (gloo), each rank with its own NF4 copy, that writes the
adapter, plot and summary once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.cli_checks import ConfigError
from velotune.cli_launch import check_request, launch_command

from .ddp_worker import rows

SRC = Path(__file__).resolve().parents[2] / "src"


def test_one_machine_is_a_standalone_torchrun_of_the_same_command():
    assert launch_command("recipe.yaml", 2, python="python") == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "velotune.cli", "train", "recipe.yaml"]


def test_several_machines_meet_at_a_c10d_rendezvous():
    assert launch_command("recipe.yaml", 8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="run7", python="python") == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29500", "--rdzv-id=run7", "-m", "velotune.cli", "train", "recipe.yaml"]


def test_bad_requests_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"--nproc 4 asks for more processes than this machine has GPUs \(2\)"):
        check_request(4, 1, None, None, gpus=2)
    with pytest.raises(ConfigError, match=r"--nproc 0"):
        check_request(0, 1, None, None, gpus=2)
    with pytest.raises(ConfigError, match=r"--nnodes 2 needs --rdzv-endpoint"):
        check_request(2, 2, None, None, gpus=2)
    check_request(2, 1, None, None, gpus=2)
    check_request(3, 1, None, None, gpus=0)  # no GPU: CPU processes (gloo), as in these tests
    from velotune.cli import main

    assert main(["train", "--nnodes", "2"]) == 2  # multi-node options without --nproc: one line, exit 2


@pytest.mark.slow  # one torchrun launch of two fresh processes (about 45 s on two shared cores)
def test_train_nproc_2_qlora_on_the_cpu(ddp_tiny_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "{text}"}}\n' for text in rows(16)))
    out = tmp_path / "out"
    (tmp_path / "recipe.yaml").write_text(
        f"model: {{model_name: '{ddp_tiny_dir}', max_seq_length: 64, load_in_4bit: true}}\n"
        "lora: {r: 8, lora_alpha: 16, use_gradient_checkpointing: unsloth}\n"
        f"data: {{path: '{data}'}}\n"
        f"training: {{output_dir: '{out}', max_steps: 2, per_device_train_batch_size: 2, logging_steps: 1, "
        "optim: adamw_torch, disable_tqdm: true}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "velotune.cli", "train", str(tmp_path / "recipe.yaml"), "--nproc",
                           "2"], env=env, capture_output=True, text=True, timeout=400)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    assert "training data-parallel (DDP) on 2 CPU processes" in text
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m velotune.cli train" in text
    assert text.count("velotune: adapter saved to") == 1 and text.count("velotune: trained 2 steps") == 1
    assert (out / "lora_model" / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.glob("*.png")] == ["training_loss.png"]
    assert not (out / ".velotune.lock").exists()
