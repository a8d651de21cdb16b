"""DPO through velotune's fast path (fused LoRA projections and kernels; Triton's interpreter on the CPU, the
real kernels on a GPU) equals transformers' Llama + PEFT under TRL's DPOTrainer: the policy pass with the
active adapter, and both reference passes, TRL's "ref" adapter made active (a trained adapter) and the
adapter disabled (a fresh one). The fused path picks the active adapter itself, so this is where a wrong
pick would show. One pair per run: the interpreter is slow (about 10 s a step)."""

from __future__ import annotations

import math

import pytest
import torch
from trl import DPOTrainer as TRLDPOTrainer

import velotune
from velotune.fast.plan import plan_step, set_fast_path

from .test_preference import PAIRS, TARGETS, one_step, perturb_lora_b, transformers_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("trained", [True, False], ids=["ref-adapter", "disabled-adapter"])
def test_dpo_step_on_the_fast_path_matches_transformers(tiny_llama_dir, tmp_path, trained):
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False,
                                                                  device_map=DEVICE, max_seq_length=64)
    ours = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS,
                                                     random_state=3, use_gradient_checkpointing=False)
    if trained:
        perturb_lora_b(ours)
    theirs = transformers_lora(tiny_llama_dir, ours).to(DEVICE)
    set_fast_path(ours, True)
    assert plan_step(ours, training=True, grad=True, labels=True).fast
    settings = dict(beta=0.1, use_cpu=DEVICE == "cpu")
    values = {}

    def move_the_policy(model):
        """Once the trainer has made its reference (copy or disabled adapter), change the trained adapter, so
        policy and reference differ: a reference pass that ran the trained adapter would give log 2."""
        perturb_lora_b(model, seed=7)
        values.update({n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n})

    def same_policy(model):  # the values ours started its step from (its own step has moved them since)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".default." in name:
                    param.copy_(values[name])

    our_loss, our_grads, _ = one_step(velotune.DPOTrainer, velotune.DPOConfig, ours, tokenizer, PAIRS[:1],
                                      tmp_path / "ours", before_train=move_the_policy, **settings)
    assert ("ref" in ours.peft_config) == trained
    their_loss, their_grads, _ = one_step(TRLDPOTrainer, velotune.DPOConfig, theirs, tokenizer, PAIRS[:1],
                                          tmp_path / "theirs", before_train=same_policy, **settings)
    assert abs(their_loss - math.log(2)) > 1e-3  # the reference differs from the policy
    assert our_loss == pytest.approx(their_loss, rel=1e-5, abs=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
