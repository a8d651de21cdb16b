"""bench/fsdp_comm.py's arithmetic (issue 21's on-paper figures) against numbers worked out by hand for the
tiny shape: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads (kv width 32), vocab 512."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def comm():
    spec = importlib.util.spec_from_file_location("fsdp_comm", ROOT / "bench" / "fsdp_comm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_counts_of_the_tiny_shape(comm):
    c = comm.counts(comm.SHAPES["tiny"], lora_rank=16)
    # q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 = 36864, plus two norms of 64
    assert c.layer == 36864 + 128 == 36992 and c.layers == 2
    assert c.root == 512 * 64 + 64 + 512 * 64 == 65600  # embeddings, final norm, lm_head
    assert c.total == 139584  # what bench_fsdp's dry run counts as trainable in full fine-tuning
    assert c.matmul == 2 * 36864 + 512 * 64 == 106496
    # r=16: q 16x(64+64) + k, v 16x(64+32) + o 16x128 + gate, up, down 16x(64+128) = 16384 per layer
    assert c.lora_per_layer == 2048 + 1536 + 1536 + 2048 + 3 * 3072 == 16384
    assert 2 * c.lora_per_layer == 32768  # bench_fsdp's dry-run LoRA count


def test_bytes_per_step(comm):
    c = comm.counts(comm.SHAPES["tiny"])
    full, lora = comm.Step(mode="full"), comm.Step(mode="lora")
    # 4 micro-batches x every unit gathered twice (forward, backward) x 139584 weights x 2 bytes
    assert comm.gathered_bytes(c, full) == 4 * 2 * 139584 * 2 == 2233344
    assert comm.gathered_bytes(c, lora) == 2233344  # the frozen base is gathered all the same
    assert comm.gathered_bytes(c, comm.Step(reshard_after_forward=False)) == 4 * 139584 * 2
    assert comm.reduced_bytes(c, full) == 139584 * 4 and comm.reduced_bytes(c, lora) == 32768 * 4
    assert comm.reduced_bytes(c, comm.Step(reduce_bytes=2)) == 139584 * 2
    assert comm.per_gpu_bytes(c, full, world=2) == (2233344 + 558336) / 2 == 1395840
    assert comm.per_gpu_bytes(c, full, world=8) == pytest.approx(7 / 8 * 2791680)
    assert comm.hsdp_inter_node_bytes(c, full, nodes=2) == 2 * 0.5 * 558336 / 8 == 69792


def test_compute_and_bandwidth(comm):
    c = comm.counts(comm.SHAPES["tiny"])
    # 6 x 106496 weights x 8192 tokens / (0.5 x 1 TFLOP/s)
    assert comm.compute_seconds(c, comm.Step(mode="full"), mfu=0.5, peak_tflops=1) == pytest.approx(0.010468982784)
    assert comm.compute_seconds(c, comm.Step(mode="lora"), mfu=0.5, peak_tflops=1) == pytest.approx(0.006979321856)
    # 1000 bytes under 1 s of compute at 90%: overlapped within 1/0.9 s, or serial within 0.1/0.9 s
    assert comm.needed_bandwidth(1000, 1.0, 0.9, overlap=True) == pytest.approx(900)
    assert comm.needed_bandwidth(1000, 1.0, 0.9, overlap=False) == pytest.approx(9000)


def test_the_table_names_each_shape_mode_and_node_count(comm, capsys):
    text = comm.main(["--shape", "llama8b", "--mode", "lora", "--nodes", "2"])
    assert text.count("| llama8b | lora | 2 |") == 1
    assert text in capsys.readouterr().out
