"""The memory estimate: each term against sizes measured on real models and a real optimizer step."""

from __future__ import annotations

import pytest
import torch

from velotune.training.memory import (MemoryEstimate, activation_bytes, activation_parts, advice, check_memory, estimate,
                                      optimizer_bytes, weight_bytes)

from .helpers import tiny_lora

GIB = 1024 ** 3


def _saved_tensor_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one forward (each storage counted once)."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # frozen weights saved by reference are not activations
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


def test_weights_and_trainable_terms_are_the_measured_bytes(tiny_llama_dir):
    model, _ = tiny_lora(tiny_llama_dir)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model) == params + buffers
    est = estimate(model, batch_size=2, max_seq_length=16, optim="adamw_torch", compute_dtype=torch.float32)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    assert est.trainable == est.gradients == lora > 0


def test_optimizer_term_matches_a_real_adamw_step(tiny_llama_dir):
    model, _ = tiny_lora(tiny_llama_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values() for k, t in state.items()
                   if k != "step")
    assert optimizer_bytes(model, "adamw_torch") == measured
    assert optimizer_bytes(model, "adamw_8bit") == measured // 4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_term_is_within_a_factor_of_two_of_measured(tiny_llama_dir, checkpointing):
    model, _ = tiny_lora(tiny_llama_dir, checkpointing=checkpointing)
    model.train()
    ids = torch.randint(4, 90, (2, 48))
    measured = _saved_tensor_bytes(model, ids)
    saved, recompute = activation_parts(model, tokens=ids.numel(), dtype=torch.float32, checkpointing=checkpointing)
    assert 0.5 * measured <= saved <= 2.0 * measured, (saved, measured)
    assert (recompute > 0) is checkpointing


def test_checkpointing_lowers_the_estimate(tiny_llama_dir):
    model, _ = tiny_lora(tiny_llama_dir)
    off = activation_bytes(model, 4096, torch.bfloat16, checkpointing=False)
    on = activation_bytes(model, 4096, torch.bfloat16, checkpointing=True)
    assert on < off


def test_clearly_too_big_names_the_settings_to_change(capsys):
    est = MemoryEstimate(weights=2 * GIB, trainable=GIB // 10, gradients=GIB // 10, optimizer=GIB // 5,
                         activations=30 * GIB, tokens=8 * 4096, checkpointing=False)
    with pytest.raises(MemoryError) as error:
        check_memory(est, available=16 * GIB, mode="error", device=torch.device("cuda"))
    message = str(error.value)
    assert "per_device_train_batch_size" in message and "use_gradient_checkpointing" in message
    assert "max_seq_length" in message
    assert "16.00 GiB" in capsys.readouterr().out  # printed next to the device's memory
    check_memory(est, available=16 * GIB, mode="warn", device=torch.device("cuda"))  # warns, no error
    assert "load_in_4bit=True" in advice(MemoryEstimate(40 * GIB, 0, 0, 0, GIB, 1, True))


def test_trainer_refuses_a_run_that_clearly_cannot_fit(tiny_llama_dir, tmp_path):
    from velotune.training import SFTTrainer, TrainingArguments

    from .helpers import quiet_args, text_dataset

    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, per_device_train_batch_size=4096, max_length=1_000_000))
    with pytest.raises(MemoryError, match="per_device_train_batch_size"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(4), args=args)
