"""Token-weighted gradient accumulation and contamination-free packing, through the real trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from velotune.training import SFTTrainer, TrainingArguments

from .helpers import quiet_args, text_dataset, text_rows
from tiny.folders import tiny_lora


class GradientRecorder(TrainerCallback):
    """Copies the trainable gradients just before the (first) optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _perturb_lora_b(model, seed=1):
    """LoRA B starts at zero, which zeroes A's gradient; give it values so both are checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _one_step_grads(folder, tmp_path, batch, accumulation, packing=False, rows=8):
    model, tokenizer = tiny_lora(folder)
    _perturb_lora_b(model)
    recorder = GradientRecorder()
    args = TrainingArguments(**quiet_args(tmp_path / f"out-{batch}x{accumulation}-{packing}", max_steps=1,
                                          per_device_train_batch_size=batch,
                                          gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
                                          packing=packing, max_length=48))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(rows, seed=3),
                         args=args, callbacks=[recorder])
    trainer.train()
    return recorder.grads, trainer


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_accumulation_equals_one_big_batch(tiny_llama_dir, tmp_path, packing):
    """8 samples as 8 x 1, 4 x 2, 2 x 4, 1 x 8 (batch x accumulation): same gradients (sum / all tokens of the step)."""
    rows = 8 if not packing else 40  # packed: 40 short texts fill at least 8 rows of 48 tokens
    reference, trainer = _one_step_grads(tiny_llama_dir, tmp_path, 8, 1, packing, rows)
    if packing:
        assert "position_ids" in trainer.data_collator(list(trainer.train_dataset.select(range(2))))
    for batch, accumulation in ((4, 2), (2, 4), (1, 8)):
        grads, _ = _one_step_grads(tiny_llama_dir, tmp_path, batch, accumulation, packing, rows)
        assert grads.keys() == reference.keys() and grads
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


def test_mean_of_micro_batch_means_would_differ(tiny_llama_dir, tmp_path):
    """The check above can fail: padded rows of different lengths make a per-micro-batch mean differ."""
    big, _ = _one_step_grads(tiny_llama_dir, tmp_path, 8, 1)
    model, tokenizer = tiny_lora(tiny_llama_dir)
    _perturb_lora_b(model)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    texts = text_rows(8, seed=3)
    rows = [{"input_ids": tokenizer(t + tokenizer.eos_token)["input_ids"]} for t in texts]
    for pair in (rows[i:i + 2] for i in range(0, 8, 2)):
        batch = collate([{**r, "labels": r["input_ids"]} for r in pair])
        (model(**batch).loss / 4).backward()
    name = next(iter(big))
    means = dict(model.named_parameters())[name].grad
    assert not torch.allclose(means, big[name], rtol=1e-3, atol=1e-6)


def test_packed_and_padded_step_are_identical(tiny_llama_dir, tmp_path):
    """Same 8 samples in one step, packed (position ids restart per sample) or padded: same loss and gradients."""
    padded, padded_trainer = _one_step_grads(tiny_llama_dir, tmp_path, 8, 1, packing=False)
    packed, packed_trainer = _one_step_grads(tiny_llama_dir, tmp_path, 8, 1, packing=True)
    assert len(packed_trainer.train_dataset) < len(padded_trainer.train_dataset)  # really packed
    loss = [e["loss"] for e in padded_trainer.state.log_history if "loss" in e]
    loss_packed = [e["loss"] for e in packed_trainer.state.log_history if "loss" in e]
    assert loss == pytest.approx(loss_packed, abs=1e-5)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-7, msg=name)


def test_packed_batch_never_attends_across_samples(tiny_llama_dir):
    """A padding-free packed row gives each sample exactly the logits and loss it has alone."""
    model, tokenizer = tiny_lora(tiny_llama_dir)
    _perturb_lora_b(model)
    model.eval()
    texts = text_rows(4, seed=5)
    samples = [tokenizer(t + tokenizer.eos_token)["input_ids"] for t in texts]
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": s, "labels": s} for s in samples])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]  # (T, V)
        start = 0
        for ids in samples:
            alone = model(input_ids=torch.tensor([ids])).logits[0]  # (t, V)
            torch.testing.assert_close(logits[start:start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            target = torch.tensor(ids[1:])
            loss_packed = torch.nn.functional.cross_entropy(logits[start:start + len(ids) - 1], target)
            loss_alone = torch.nn.functional.cross_entropy(alone[:-1], target)
            assert loss_packed.item() == pytest.approx(loss_alone.item(), abs=1e-6)
            start += len(ids)
