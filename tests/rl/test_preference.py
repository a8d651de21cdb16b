"""Preference training through TRL's trainers: a velotune model and the same weights in transformers' own
Llama with PEFT give the same DPO/KTO/ORPO/SimPO loss and LoRA gradients (one step, fp32); the reference
model is the adapter-disabled model (no copy) while the adapter is untrained, TRL's copy once it is not.

Each run is one optimizer step of a tiny random Llama on 4 rows (about a second on one thread)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, TrainerCallback
from trl import DPOTrainer as TRLDPOTrainer
from trl import KTOTrainer as TRLKTOTrainer

import velotune
from velotune import FastLanguageModel
from velotune.rl.experimental import trl_experimental


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5, or maybe 22"},
         {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " London."},
         {"prompt": "Say hi", "chosen": " hi", "rejected": " no"},
         {"prompt": "Colour of the sky?", "chosen": " Blue.", "rejected": " Green, surely."}]
UNPAIRED = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in PAIRS for side in ("chosen", "rejected")][:4]


def velotune_lora(folder):
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=3,
                                             use_gradient_checkpointing=False)
    return model, tokenizer


def transformers_lora(folder, like):
    """transformers' own Llama with PEFT's LoRA, holding the adapter values of `like`."""
    base = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                            bias="none", task_type="CAUSAL_LM"))
    reference = dict(like.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(reference[name])
    return model


def perturb_lora_b(model, seed=1):
    """LoRA B starts at zero, which zeroes A's gradient and the policy/reference gap: give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


class GradientRecorder(TrainerCallback):
    """The trainable gradients just before the first optimizer step."""

    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}


def one_step(trainer_cls, config_cls, model, tokenizer, rows, out, before_train=None, **config):
    """(loss, LoRA gradients, trainer) of one optimizer step; `before_train(model)` runs after the trainer
    is built (TRL has set up its reference adapter by then)."""
    recorder = GradientRecorder()
    settings = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=len(rows), learning_rate=1e-3,
                    max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False,
                    use_cpu=True, disable_tqdm=True, gradient_checkpointing=False, seed=0)
    args = config_cls(**{**settings, **config})
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[recorder])
    if before_train is not None:
        before_train(model)
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, recorder.grads, trainer


TRL_CLASSES = {"dpo": (TRLDPOTrainer, "DPOConfig"), "kto": (TRLKTOTrainer, "KTOConfig"),
               "orpo": (trl_experimental("orpo", "ORPOTrainer"), "ORPOConfig"),
               "simpo": (trl_experimental("cpo", "CPOTrainer"), "CPOConfig")}
VELOTUNE_TRAINERS = {"dpo": "DPOTrainer", "kto": "KTOTrainer", "orpo": "ORPOTrainer", "simpo": "CPOTrainer"}
SETTINGS = {"dpo": {"beta": 0.1}, "kto": {"beta": 0.1}, "orpo": {"beta": 0.1},
            "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5, "beta": 2.0}}


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "simpo"])
def test_loss_and_lora_gradients_match_transformers(tiny_llama_dir, tmp_path, method):
    """velotune's model under velotune's trainer vs transformers' Llama + PEFT under TRL's own trainer."""
    rows = UNPAIRED if method == "kto" else PAIRS
    config_cls = getattr(velotune, TRL_CLASSES[method][1])
    ours, tokenizer = velotune_lora(tiny_llama_dir)
    perturb_lora_b(ours)
    theirs = transformers_lora(tiny_llama_dir, ours)
    our_loss, our_grads, _ = one_step(getattr(velotune, VELOTUNE_TRAINERS[method]), config_cls, ours, tokenizer,
                                      rows, tmp_path / "ours", **SETTINGS[method])
    their_loss, their_grads, _ = one_step(TRL_CLASSES[method][0], config_cls, theirs, tokenizer, rows,
                                          tmp_path / "theirs", **SETTINGS[method])
    assert our_loss == pytest.approx(their_loss, rel=1e-5, abs=1e-6)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * len(TARGETS) * 2
    for name, grad in their_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_untrained_adapter_reference_is_the_disabled_adapter(tiny_llama_dir, tmp_path, method):
    """A fresh adapter (B = 0): velotune deletes TRL's "ref" copy and TRL disables the adapter for the
    reference pass; loss and gradients equal TRL's own trainer keeping its copy, on the same velotune model."""
    rows = UNPAIRED if method == "kto" else PAIRS
    config_cls = getattr(velotune, TRL_CLASSES[method][1])
    ours, tokenizer = velotune_lora(tiny_llama_dir)
    our_loss, our_grads, trainer = one_step(getattr(velotune, VELOTUNE_TRAINERS[method]), config_cls, ours,
                                            tokenizer, rows, tmp_path / "ours", beta=0.1)
    assert list(ours.peft_config) == ["default"] and trainer.ref_model is None
    again, _ = velotune_lora(tiny_llama_dir)  # same seed: the same fresh adapter
    their_loss, their_grads, _ = one_step(TRL_CLASSES[method][0], config_cls, again, tokenizer, rows,
                                          tmp_path / "theirs", beta=0.1)
    assert "ref" in again.peft_config  # TRL 1.16 copies the adapter
    assert our_loss == pytest.approx(their_loss, rel=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trained_adapter_keeps_trls_reference_copy(tiny_llama_dir, tmp_path):
    """An adapter that already differs from the base (DPO after SFT): the reference must be that adapter
    as training began, so TRL's frozen copy stays and equals the starting adapter."""
    model, tokenizer = velotune_lora(tiny_llama_dir)
    perturb_lora_b(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    _, _, trainer = one_step(velotune.DPOTrainer, velotune.DPOConfig, model, tokenizer, PAIRS, tmp_path)
    assert "ref" in model.peft_config
    params = dict(model.named_parameters())
    for name, value in start.items():
        torch.testing.assert_close(params[name.replace(".default.", ".ref.")], value, rtol=0, atol=0)
    assert not torch.equal(params[next(iter(start))], next(iter(start.values())))  # the policy moved


def test_precomputed_reference_log_probs_give_the_same_step(tiny_llama_dir, tmp_path):
    ours, tokenizer = velotune_lora(tiny_llama_dir)
    perturb_lora_b(ours)
    live_loss, live_grads, _ = one_step(velotune.DPOTrainer, velotune.DPOConfig, ours, tokenizer, PAIRS,
                                        tmp_path / "live")
    again, _ = velotune_lora(tiny_llama_dir)
    perturb_lora_b(again)
    pre_loss, pre_grads, trainer = one_step(velotune.DPOTrainer, velotune.DPOConfig, again, tokenizer, PAIRS,
                                            tmp_path / "pre", precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    assert pre_loss == pytest.approx(live_loss, rel=1e-5)
    for name, grad in live_grads.items():
        torch.testing.assert_close(pre_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_disabled_adapter_as_trl_calls_it_is_the_base_model(tiny_llama_dir):
    """TRL's reference pass (`trl.trainer.utils.use_adapter(model, None)` -> PEFT's `disable_adapter()`) on a
    velotune model with a non-zero adapter computes transformers' Llama without the adapter; afterwards the
    adapter is back."""
    from trl.trainer.utils import use_adapter

    ours, _ = velotune_lora(tiny_llama_dir)
    perturb_lora_b(ours)
    base = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 60, 8, 41]])
    ours.eval()
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        with use_adapter(ours, adapter_name=None):
            disabled = ours(input_ids=ids).logits
        again = ours(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    torch.testing.assert_close(disabled, expected, rtol=1e-5, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "simpo"])
def test_a_few_steps_raise_the_preference_margin(tiny_llama_dir, tmp_path, method):
    """Training learns: after 12 steps the model's log-probability margin of chosen over rejected answers
    (paired methods) or of desirable over undesirable ones (KTO) has grown."""
    rows = UNPAIRED if method == "kto" else PAIRS
    model, tokenizer = velotune_lora(tiny_llama_dir)
    args = getattr(velotune, TRL_CLASSES[method][1])(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=len(rows), learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True,
        disable_tqdm=True, gradient_checkpointing=False, seed=0, **SETTINGS[method])
    trainer = getattr(velotune, VELOTUNE_TRAINERS[method])(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                                           processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if method == "kto":
        first, last = logs[0], logs[-1]
        assert last["loss"] < first["loss"]
        assert last["logps/chosen"] - first["logps/chosen"] > last["logps/rejected"] - first["logps/rejected"]
    else:
        margin = [entry["logps/chosen"] - entry["logps/rejected"] for entry in logs]
        assert margin[-1] > margin[0] + 0.25, margin  # ORPO/SimPO log-probs are per-token means: smaller
        assert logs[-1]["loss"] < logs[0]["loss"]
