"""FSDP2 through velotune's SFTTrainer (`fsdp=True`, issue 19 items 2 and 4) on the CPU: gloo, 2 ranks.

One torchrun launch trains LoRA (fast path, offloading checkpoint) and full fine-tuning sharded per
decoder layer, with distributed checkpoints, and resumes each step-2 checkpoint on the same 2 ranks;
one plain process trains the unsharded references with the same global batch, resumes those 2-rank
checkpoints on 1 process and consolidates the step-4 checkpoints into ordinary folders. The checks:
sharded == unsharded (losses, eval losses and final weights within fp32 tolerance, also with gradient
accumulation), weights and optimizer state really sharded, resume on 2 and on 1 == the uninterrupted
run, load_best_model_at_end, consolidated == the gathered final save, and the consolidated folders
load in velotune and in transformers (+ PEFT) with equal logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def runs(fsdp_runs):
    """The 2-rank and the one-process launches (conftest.py: shared with test_fsdp2.py's job)."""
    sharded, one, _ = fsdp_runs
    return sharded, one


def result(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"result-{rank}.json").read_text())


def assert_same_weights(kind: str, a: Path, b: Path) -> None:
    first, second = load_file(a / WEIGHTS[kind]), load_file(b / WEIGHTS[kind])
    assert first.keys() == second.keys() and first
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_sharded_ranks_train_as_one_unsharded_process(runs, kind):
    sharded, one = runs
    ranks, reference = [result(sharded / kind, r) for r in (0, 1)], result(one / kind)
    assert reference["world_size"] == 1 and reference["wrapped"] != "ShardedModel"
    assert len(reference["losses"]) == 4 and reference["losses"][0] != reference["losses"][-1]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["wrapped"] == "ShardedModel"
        assert rank["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert len(rank["eval_losses"]) == 2
        assert rank["eval_losses"] == pytest.approx(reference["eval_losses"], rel=1e-5)
        # every trainable weight is a DTensor and each rank holds half of its optimizer state
        assert rank["trainable_dtensor"] == rank["trainable"] > 0
        assert rank["state_local"] * 2 == rank["state_full"]
    if kind == "lora":  # the frozen base is sharded too, and the fast path resolves each layer inside its call
        assert ranks[0]["frozen_dtensor"] > 0 and ranks[0]["fast"] and ranks[0]["per_layer"]
    else:
        assert ranks[0]["trainable"] == reference["trainable"] and ranks[0]["frozen_dtensor"] == 0
    assert_same_weights(kind, sharded / kind / "final", one / kind / "final")


def test_gradient_accumulation_reduces_once_per_step_with_the_same_result(runs):
    sharded, one = runs
    accumulated, reference = result(sharded / "lora-accum"), result(one / "lora")
    assert accumulated["world_size"] == 2 and accumulated["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert_same_weights("lora", sharded / "lora-accum" / "final", one / "lora" / "final")


def test_load_best_model_at_end_reads_the_best_distributed_checkpoint(runs):
    sharded, one = runs
    best = result(sharded / "lora-best")
    assert best["eval_losses"][0] > best["eval_losses"][1]  # step 2 is "best" only by greater_is_better=True
    assert_same_weights("lora", sharded / "lora-best" / "final", one / "lora-best" / "consolidated")
    last = load_file(sharded / "lora" / "final" / WEIGHTS["lora"])
    ended = load_file(sharded / "lora-best" / "final" / WEIGHTS["lora"])
    assert any(not torch.allclose(last[name], ended[name]) for name in last)  # not the last step's weights


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_distributed_checkpoint_resumes_on_two_ranks_and_on_one(runs, kind):
    sharded, one = runs
    checkpoint = sharded / kind / "checkpoint-2"
    assert (checkpoint / "model_dcp" / ".metadata").is_file() and (checkpoint / "optimizer_dcp").is_dir()
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (checkpoint / WEIGHTS[kind]).exists()  # no rank gathered the whole model to save it
    for resumed in (sharded / kind / "resumed", one / kind / "resumed1"):
        assert result(resumed)["global_step"] == 4
        assert result(resumed)["losses"] == pytest.approx(result(sharded / kind)["losses"], rel=1e-5)
        assert_same_weights(kind, resumed / "final", sharded / kind / "final")


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_consolidated_checkpoint_is_an_ordinary_folder(runs, kind, ddp_tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from velotune import FastLanguageModel

    sharded, one = runs
    folder = one / kind / "consolidated"
    assert_same_weights(kind, folder, sharded / kind / "final")  # == the gathered save at the same step
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu", dtype=torch.float32)
    if kind == "lora":
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ddp_tiny_dir), str(folder))
    else:
        theirs = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits_of(ours.eval(), ids), logits_of(theirs.eval(), ids), rtol=1e-4, atol=1e-4)
    base = logits_of(AutoModelForCausalLM.from_pretrained(ddp_tiny_dir).eval(), ids)
    assert not torch.allclose(logits_of(theirs, ids), base)  # the trained weights, not the base model's
