"""The memory estimate: each term against sizes measured on real models and a real optimizer step."""

from __future__ import annotations

import logging

import pytest
import torch

from velotune.training.memory import (MemoryEstimate, activation_bytes, activation_parts, advice, check_memory, estimate,
                                      optimizer_bytes, weight_bytes)

from tiny.folders import tiny_lora

GIB = 1024 ** 3
LLAMA8B_TABLE = 128256 * 4096 * 2  # Llama-3.1-8B's untied bf16 input embedding: in host memory while training


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


def test_clearly_too_big_names_the_settings_to_change(caplog):
    est = MemoryEstimate(weights=2 * GIB, trainable=GIB // 10, gradients=GIB // 10, optimizer=GIB // 5,
                         activations=30 * GIB, tokens=8 * 4096, checkpointing=False)
    with caplog.at_level(logging.INFO, logger="velotune"), pytest.raises(MemoryError) as error:
        check_memory(est, available=16 * GIB, mode="error", device=torch.device("cuda"))
    message = str(error.value)
    assert "per_device_train_batch_size" in message and "use_gradient_checkpointing" in message
    assert "max_seq_length" in message
    # next to the device's memory; logged as a warning since it does not fit (printed only when it does)
    assert any("16.00 GiB" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    check_memory(est, available=16 * GIB, mode="warn", device=torch.device("cuda"))  # warns, no error
    assert "load_in_4bit=True" in advice(MemoryEstimate(40 * GIB, 0, 0, 0, GIB, 1, True))


def test_trainer_refuses_a_run_that_clearly_cannot_fit(tiny_llama_dir, tmp_path):
    from velotune.training import SFTTrainer, TrainingArguments

    from .helpers import quiet_args, text_dataset

    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, per_device_train_batch_size=4096, max_length=1_000_000))
    with pytest.raises(MemoryError, match="per_device_train_batch_size"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(4), args=args)


def test_fast_path_term_is_within_a_factor_of_two_of_measured(tiny_llama_dir):
    """The fused layers' saved tensors (fast path forced on the CPU) against the fast-path formula."""
    from velotune.fast.plan import set_fast_path
    from velotune.training.memory import fast_path_activations

    model, _ = tiny_lora(tiny_llama_dir)
    set_fast_path(model, True)
    model.train()
    ids = torch.randint(4, 90, (2, 48))
    measured = _saved_tensor_bytes(model, ids)
    formula = fast_path_activations(model, ids.numel(), torch.float32, checkpointing=False, offload=False,
                                    graphs=False, four_bit=False)
    assert 0.5 * measured <= formula.device <= 2.0 * measured, (formula.device, measured)
    assert formula.host == 0


@pytest.fixture(scope="module")
def llama8b_qlora_on_meta():
    """Llama-3.1-8B's shape in NF4 with LoRA r=32 on every projection, built on the meta device (no memory)."""
    from transformers import LlamaConfig

    from velotune.lora import get_peft_model
    from velotune.models.families import LlamaForCausalLM
    from velotune.quant import quantize_model_

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    quantize_model_(model, compute_dtype=torch.bfloat16)
    return get_peft_model(model, r=32, lora_alpha=32, use_gradient_checkpointing="unsloth", max_seq_length=32768,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_8b_qlora_at_32k_tokens_is_not_refused_on_a_24_gib_gpu(llama8b_qlora_on_meta):
    """Measured on the H200: 14.04 GiB reserved (10.68 allocated; BENCHMARKS.md), with the input embedding on the
    GPU; it now waits in host memory while training (fast/host_embedding.py). The plain-path formula said about 51
    GiB and refused it."""
    cuda = torch.device("cuda")
    est = estimate(llama8b_qlora_on_meta, 1, 32768, "adamw_torch", torch.bfloat16, device=cuda)
    assert est.fast_path and est.checkpointing and est.host == 32 * 32768 * 4096 * 2 + LLAMA8B_TABLE  # + layer inputs
    assert abs(est.total / (14.04 * GIB - LLAMA8B_TABLE) - 1) < 0.15, est.describe()
    check_memory(est, available=24 * GIB, mode="error", device=cuda)  # no MemoryError
    plain = estimate(llama8b_qlora_on_meta, 1, 32768, "adamw_torch", torch.bfloat16, device=cuda, fast_path=False)
    with pytest.raises(MemoryError):  # what the estimate said before it knew the fast path
        check_memory(plain, available=24 * GIB, mode="error", device=cuda)


def test_a_run_that_cannot_fit_a_24_gib_gpu_is_refused(llama8b_qlora_on_meta):
    cuda = torch.device("cuda")
    est = estimate(llama8b_qlora_on_meta, 1, 32768, "adamw_torch", torch.bfloat16, checkpointing=False, device=cuda)
    assert est.fast_path and est.host == LLAMA8B_TABLE  # no layer inputs offloaded: the input embedding alone
    with pytest.raises(MemoryError, match="use_gradient_checkpointing"):
        check_memory(est, available=24 * GIB, mode="error", device=cuda)
