"""The frozen input embedding in host memory while training (fast/host_embedding.py): the lookup's values, when the
plan moves it (and why not), the memory estimate, and on CUDA a training step equal to the one with the table on the
GPU, the table back on the GPU for the generation engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny.families import make_config
from tiny.lora import batch, loss_and_grads, lora_model
from velotune.fast import host_embedding
from velotune.fast.host_embedding import host_lookup, keep_on_device, offloadable
from velotune.fast.plan import plan_step


@pytest.fixture
def any_size(monkeypatch):
    """Tiny tables count as large enough to move."""
    monkeypatch.setattr(host_embedding, "MIN_BYTES", 0)


def _train_plan(model, device="cuda", **hints):
    causal = model.get_base_model()
    return plan_step(model, training=True, grad=True, labels=True, device=device, lm_head=causal.lm_head, **hints)


@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (3, 5, 7)])
def test_host_lookup_is_the_embedding(shape):
    """The host path's rows are F.embedding's, in the ids' shape, on the device asked (the CPU here; CUDA below)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 12, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 50, shape, generator=gen)
    out = host_lookup(weight, ids, torch.device("cpu"))
    assert out.shape == (*shape, 12) and out.dtype == torch.bfloat16
    assert torch.equal(out, F.embedding(ids, weight))


def test_only_a_frozen_untied_plain_table_moves(any_size):
    model = lora_model("llama")
    causal = model.get_base_model()
    table = causal.model.embed_tokens
    assert offloadable(table, causal.lm_head) is None
    assert "without its lm_head" in offloadable(table, None)
    causal.lm_head.weight = table.weight
    assert "tied" in offloadable(table, causal.lm_head)
    tied = lora_model("qwen3")  # tie_word_embeddings=True
    assert "tied" in offloadable(tied.get_base_model().model.embed_tokens, tied.get_base_model().lm_head)
    trained = lora_model("llama", modules_to_save=["embed_tokens"])
    embedding = trained.get_base_model().model.embed_tokens
    assert "not a plain Embedding" in offloadable(embedding, trained.get_base_model().lm_head)
    table.weight.requires_grad_(True)
    assert offloadable(table, lora_model("llama").get_base_model().lm_head) == "embed_tokens trains"


def test_decoder_reads_a_host_table_through_the_lookup(monkeypatch):
    """The decoder's host branch (on the CPU the table and the layers share a device, so the branch is forced): the
    same loss and LoRA gradients as the module's own lookup."""
    from velotune.models import decoder as decoder_module

    model = lora_model("llama")
    inputs = batch()
    ref_out, ref_grads = loss_and_grads(model, inputs)
    calls = []

    def lookup(weight, ids, device):
        calls.append(ids.shape)
        return host_lookup(weight, ids, device)

    monkeypatch.setattr(decoder_module, "is_on_host", lambda embedding, device: True)
    monkeypatch.setattr(decoder_module, "host_lookup", lookup)
    out, grads = loss_and_grads(model, inputs)
    assert calls == [inputs["input_ids"].shape]
    assert torch.equal(out.loss, ref_out.loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_small_tables_stay():
    model = lora_model("llama").get_base_model()
    assert "under 64 MiB" in offloadable(model.model.embed_tokens, model.lm_head)


def test_the_plan_moves_it_for_cuda_training_calls_only(any_size, monkeypatch):
    """Planned for CUDA (the device hint), training with autograd; not for evaluation, generation, the CPU, the
    switch off, or once the generation engine claimed the table."""
    model = lora_model("llama")
    assert _train_plan(model).host_embedding
    assert not _train_plan(model, device="cpu").host_embedding
    assert not plan_step(model, training=False, grad=False, device="cuda",
                         lm_head=model.get_base_model().lm_head).host_embedding
    assert not _train_plan(model, cache=True).host_embedding
    monkeypatch.setenv("VELOTUNE_HOST_EMBEDDING", "0")
    assert not _train_plan(model).host_embedding
    monkeypatch.delenv("VELOTUNE_HOST_EMBEDDING")
    keep_on_device(model.get_base_model().model)
    assert not _train_plan(model).host_embedding


def test_memory_estimate_counts_the_table_on_the_host(any_size, monkeypatch):
    from velotune.training.memory import estimate

    model = lora_model("llama")
    table = model.get_base_model().model.embed_tokens.weight
    size = table.numel() * table.element_size()
    moved = estimate(model, 2, 64, "adamw_torch", torch.float32, device="cuda")
    monkeypatch.setenv("VELOTUNE_HOST_EMBEDDING", "0")
    kept = estimate(model, 2, 64, "adamw_torch", torch.float32, device="cuda")
    assert kept.weights - moved.weights == size and moved.host - kept.host == size


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("nf4", [False, True])
def test_training_with_the_table_on_the_host_is_exact_on_cuda(any_size, monkeypatch, nf4):
    """Loss and every LoRA gradient of three calls equal to the table kept on the GPU (the same embedding rows; a
    gradient may differ by the GPU's order of atomic sums, so those compare to 1e-3 of their norm); the table ends in
    pinned host memory, the model's `device` stays CUDA."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("VELOTUNE_HOST_EMBEDDING", switch)
        model = lora_model("llama", dtype=torch.bfloat16, device="cuda", nf4=nf4, checkpointing="unsloth")
        steps = [loss_and_grads(model, batch("cuda", seed=s)) for s in range(3)]
        runs[switch] = model, steps
    model, steps = runs["1"]
    table = model.get_base_model().model.embed_tokens.weight
    assert table.device.type == "cpu" and table.is_pinned() and model.get_base_model().device.type == "cuda"
    assert runs["0"][0].get_base_model().model.embed_tokens.weight.is_cuda
    for (out, grads), (ref_out, ref_grads) in zip(steps, runs["0"][1]):
        assert torch.equal(out.loss, ref_out.loss)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            error = (grad.float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm().clamp_min(1e-12)
            assert error <= 1e-3, (name, error.item())


@gpu
def test_generation_brings_the_table_back_on_cuda(any_size, monkeypatch, tiny_llama_dir):
    """After a training call moved it, generating puts it back on the GPU for good (later training keeps it there),
    with the same greedy tokens as a model whose table never moved."""
    from velotune import FastLanguageModel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    outputs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("VELOTUNE_HOST_EMBEDDING", switch)
        model, _ = FastLanguageModel.from_pretrained(tiny_llama_dir, load_in_4bit=False, device_map="cuda")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
        decoder = model.get_base_model().model
        ids = torch.randint(3, decoder.config.vocab_size, (2, 16), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert decoder.embed_tokens.weight.device.type == ("cpu" if switch == "1" else "cuda")
        FastLanguageModel.for_inference(model)
        outputs[switch] = model.generate(input_ids=ids[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert decoder.embed_tokens.weight.is_cuda and not decoder.runtime.host_embedding
        FastLanguageModel.for_training(model)
        model(input_ids=ids, labels=ids).loss.backward()
        assert decoder.embed_tokens.weight.is_cuda
    assert outputs["1"].shape == (1, 14) and torch.equal(outputs["1"], outputs["0"])
