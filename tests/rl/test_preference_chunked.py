"""ORPO, CPO (sigmoid, with its NLL term) and SimPO (mean log-probs, no NLL) through velotune's chunked log-prob path (rl/preference_logps.py) equal TRL's own trainers
building the full logits, on the same velotune model: loss, LoRA gradients and the logged metrics (log-probs,
rewards, NLL, the logits means). The chunked path never runs the LM head module: it reads the head's weight
(on the GPU the kernel builds a chunk of logits at a time; the CPU takes the kernel's reference, whose parity with
the kernel tests/kernels checks).
DPO's IPO loss, on TRL's own chunked head, is checked beside them. One optimizer step each, fp32."""

from __future__ import annotations

import pytest
import torch

import velotune
from velotune.rl.experimental import trl_experimental

from .test_preference import PAIRS, one_step, perturb_lora_b, velotune_lora

CASES = {
    "orpo": ("ORPOTrainer", "orpo", "ORPOConfig", {"beta": 0.1}),
    "simpo": ("CPOTrainer", "cpo", "CPOConfig", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5,
                                                  "beta": 2.0}),
    "cpo-sigmoid": ("CPOTrainer", "cpo", "CPOConfig", {"loss_type": "sigmoid", "cpo_alpha": 1.0, "beta": 0.1}),
}
METRICS = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "logits/chosen", "logits/rejected", "nll_loss")


def count_lm_head_calls(model) -> list:
    calls = []
    model.get_base_model().lm_head.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_preference_step_equals_trls_full_logits(tiny_llama_dir, tmp_path, case):
    name, module, config_name, settings = CASES[case]
    config_cls = getattr(velotune, config_name)
    ours, tokenizer = velotune_lora(tiny_llama_dir)
    perturb_lora_b(ours)
    head_calls = count_lm_head_calls(ours)
    our_loss, our_grads, our_trainer = one_step(getattr(velotune, name), config_cls, ours, tokenizer, PAIRS,
                                                tmp_path / "ours", **settings)
    assert head_calls == []  # log-probs came from the hidden states and the head's weight, a chunk at a time
    theirs, _ = velotune_lora(tiny_llama_dir)
    perturb_lora_b(theirs)
    their_calls = count_lm_head_calls(theirs)
    their_loss, their_grads, their_trainer = one_step(trl_experimental(module, name), config_cls, theirs, tokenizer,
                                                      PAIRS, tmp_path / "theirs", **settings)
    assert their_calls  # TRL's own trainer builds the logits
    assert our_loss == pytest.approx(their_loss, rel=1e-5, abs=1e-6)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for key, grad in their_grads.items():
        torch.testing.assert_close(our_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
    ours_logged = next(e for e in our_trainer.state.log_history if "loss" in e)
    theirs_logged = next(e for e in their_trainer.state.log_history if "loss" in e)
    for metric in METRICS:
        if metric in theirs_logged:
            assert ours_logged[metric] == pytest.approx(theirs_logged[metric], rel=1e-4, abs=1e-5), metric


def test_dpo_ipo_loss_equals_trls(tiny_llama_dir, tmp_path):
    """IPO (length-normalized squared loss) on velotune's DPOTrainer and TRL's, the same velotune model."""
    from trl import DPOTrainer as TRLDPOTrainer

    ours, tokenizer = velotune_lora(tiny_llama_dir)
    perturb_lora_b(ours)
    settings = dict(loss_type="ipo", beta=0.1)
    our_loss, our_grads, _ = one_step(velotune.DPOTrainer, velotune.DPOConfig, ours, tokenizer, PAIRS,
                                      tmp_path / "ours", **settings)
    theirs, _ = velotune_lora(tiny_llama_dir)
    perturb_lora_b(theirs)
    their_loss, their_grads, _ = one_step(TRLDPOTrainer, velotune.DPOConfig, theirs, tokenizer, PAIRS,
                                          tmp_path / "theirs", **settings)
    assert our_loss == pytest.approx(their_loss, rel=1e-5, abs=1e-6)
    for key, grad in their_grads.items():
        torch.testing.assert_close(our_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
