"""The fast path on CUDA (skipped without a GPU): on by itself, close to the plain path in bf16
(dense and NF4 bases), offloaded checkpointing exact, and a 50-step convergence run.

Run on the GPU machine: `PYTHONPATH=src python -m pytest -q tests/fast/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from tiny.lora import batch, loss_and_grads, lora_model
from velotune.fast.plan import plan_step, set_fast_path

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "phi3_partial"]


@pytest.fixture(autouse=True)
def _kernels_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CUDA tensors take the compiled kernels


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _compare_bf16(fast, plain, fast_grads, plain_grads, tol=3e-2):
    assert abs(fast.loss.item() - plain.loss.item()) <= tol * abs(plain.loss.item())
    assert fast_grads.keys() == plain_grads.keys()
    worst = max(_relative_error(fast_grads[n], g) for n, g in plain_grads.items())
    assert worst <= 5 * tol, f"largest relative gradient error {worst:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_turns_on_and_matches_plain_in_bf16(family):
    model = lora_model(family, dtype=torch.bfloat16, device="cuda")
    decision = plan_step(model)
    assert decision.fast and "on CUDA" in decision.reason, decision.reason
    inputs = batch("cuda", B=2, T=64)
    fast, fast_grads = loss_and_grads(model, inputs)
    assert fast.logits is None
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    _compare_bf16(fast, plain, fast_grads, plain_grads)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_qlora_fast_path_matches_plain(family):
    model = lora_model(family, dtype=torch.bfloat16, device="cuda", nf4=True)
    assert plan_step(model).fast
    inputs = batch("cuda", B=2, T=64)
    fast, fast_grads = loss_and_grads(model, inputs)
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    _compare_bf16(fast, plain, fast_grads, plain_grads)


@pytest.mark.parametrize("fast, checkpointing", [(True, "unsloth"), (False, "unsloth"), (True, True)],
                         ids=["fused", "plain", "fused-kept"])
def test_offloaded_checkpointing_on_cuda_matches_no_checkpointing(fast, checkpointing):
    """Offloaded ("unsloth") and kept (True on the fast path) layer inputs, eager (the padded batch's mask is a
    tensor, so no CUDA graphs): the gradients of no checkpointing."""
    inputs = batch("cuda", B=2, T=64)
    reference = lora_model("llama", dtype=torch.bfloat16, device="cuda")
    set_fast_path(reference, fast)
    out_ref, expected = loss_and_grads(reference, inputs)
    model = lora_model("llama", dtype=torch.bfloat16, device="cuda", checkpointing=checkpointing)
    set_fast_path(model, fast)
    checkpointer = model.get_base_model().model._checkpointer
    model.get_base_model().model.runtime.offload_min_tokens = 0  # offload these short sequences too
    out, grads = loss_and_grads(model, inputs)
    layers = model.config.num_hidden_layers
    assert (checkpointer.offloaded, checkpointer.kept) == ((layers, 0) if checkpointing == "unsloth" else (0, layers))
    torch.testing.assert_close(out.loss, out_ref.loss)
    for name, g in expected.items():
        assert _relative_error(grads[name], g) < 1e-2, name


def _convergence_run(fast: bool, steps: int = 50) -> list[float]:
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = lora_model("llama", dtype=torch.bfloat16, device="cuda", config=config, r=16, lora_alpha=32,
                       checkpointing="unsloth", realistic=True)
    set_fast_path(model, fast)
    gen = torch.Generator().manual_seed(0)
    # Learnable data: each next token is a fixed permutation of the current one (64 tokens).
    successor = torch.randperm(64, generator=gen) + 3
    corpus = torch.empty(16, 128, dtype=torch.long)
    corpus[:, 0] = torch.randint(3, 67, (16,), generator=gen)
    for t in range(1, 128):
        corpus[:, t] = successor[corpus[:, t - 1] - 3]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, fused=True)
    losses = []
    for step in range(steps):
        ids = corpus[torch.arange(8) + (step * 8) % 16].cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_fifty_step_convergence_fast_vs_plain():
    """Same init, same data, same optimizer: the loss curves agree within bf16 tolerance."""
    fast, plain = _convergence_run(True), _convergence_run(False)
    assert plain[-1] < plain[0] - 0.5, f"the plain run did not learn: {plain[0]:.3f} -> {plain[-1]:.3f}"
    for step, (f, p) in enumerate(zip(fast, plain)):
        assert abs(f - p) <= 0.03 * p + 0.02, f"step {step}: fast {f:.4f} vs plain {p:.4f}"


def test_lora_dropout_on_cuda_warns_and_keeps_the_plain_path(caplog):
    import logging

    from velotune.fast import plan as fast_path

    model = lora_model("llama", dtype=torch.bfloat16, device="cuda", lora_dropout=0.1)
    fast_path._logged.clear()
    with caplog.at_level(logging.INFO, logger="velotune"):
        decision = plan_step(model)
    assert not decision.fast and decision.warn and "lora_dropout=0.1" in decision.reason
    assert any(r.levelno == logging.WARNING and "plain path" in r.getMessage() for r in caplog.records)
    out = model(**batch("cuda", B=2, T=16))
    assert out.logits is not None
