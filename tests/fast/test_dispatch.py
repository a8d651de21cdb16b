"""The fast-path switch (velotune.fast.plan) and the exactness of the fused path on the CPU.

Forcing the fast path on (`set_fast_path(model, True)`) runs the fused LoRA functions, the
kernel ops (their CPU references) and the fused cross-entropy; it must give the plain path's
loss and gradients in fp32. This is the exactness proof CI can run.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tiny.lora import batch, loss_and_grads, lora_model
from velotune.fast import plan as fast_path
from velotune.fast.plan import plan_step, set_fast_path
from velotune.quant import is_linear4bit

FAMILIES = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "phi3_partial"]


def test_decision_table(monkeypatch):
    monkeypatch.delenv(fast_path.DISABLE_ENV, raising=False)
    model = lora_model("llama")
    auto = plan_step(model)
    assert not auto.fast and "on cpu" in auto.reason  # no CUDA -> plain
    forced = plan_step(model, fast_path=True)
    assert forced.fast and "forced" in forced.reason
    set_fast_path(model, True)
    assert plan_step(model).fast
    assert not plan_step(model, fast_path=False).fast
    monkeypatch.setenv(fast_path.DISABLE_ENV, "1")
    env = plan_step(model)
    assert not env.fast and fast_path.DISABLE_ENV in env.reason  # the variable beats everything


@pytest.mark.parametrize(
    "lora, expected",
    [
        (dict(lora_dropout=0.1), "lora_dropout=0.1"),
        (dict(bias="lora_only"), "bias"),  # qwen2's q/k/v biases train
        (dict(bias="all"), "bias"),
    ],
)
def test_unsupported_lora_settings_keep_the_plain_path(lora, expected):
    model = lora_model("qwen2", **lora)
    decision = plan_step(model, fast_path=True)
    assert not decision.fast
    assert "model.layers.0.self_attn.q_proj" in decision.reason and expected in decision.reason


def test_int8_base_layers_keep_the_plain_path():
    """bitsandbytes' Linear8bitLt is an nn.Linear whose int8 weight means nothing without its row scales: the
    fused path must not read it as a dense weight (it did, and load_in_8bit LoRA did not learn on the GPU);
    the engine does not capture its decode steps (the export check's generation failed in capture)."""
    from velotune.inference.engine import _graph_safe

    bnb = pytest.importorskip("bitsandbytes")
    model = lora_model("llama")
    assert _graph_safe(fast_path.find_decoder(model))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    base = q_proj.base_layer
    q_proj.base_layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=False, has_fp16_weights=False)
    decision = plan_step(model, fast_path=True)
    assert not decision.fast
    assert "model.layers.0.self_attn.q_proj" in decision.reason and "Linear8bitLt" in decision.reason
    # nor is a decode step with int8 layers captured as a CUDA graph (their matmul syncs with the host)
    assert not _graph_safe(fast_path.find_decoder(model))


def test_generic_models_and_bad_settings():
    plain = torch.nn.Linear(2, 2)
    assert "not a velotune decoder" in plan_step(plain).reason
    with pytest.raises(ValueError, match="no velotune decoder"):
        set_fast_path(plain, True)
    with pytest.raises(ValueError, match="allowed values are True, False and None"):
        set_fast_path(lora_model("llama"), "yes")


def test_decision_is_logged_once(caplog):
    model = lora_model("qwen3")
    fast_path._logged.clear()
    with caplog.at_level(logging.INFO, logger="velotune"):
        for _ in range(3):
            plan_step(model, fast_path=True)
    messages = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert len(messages) == 1 and "qwen3" in messages[0]


# Through the kernels' Triton code too (interpreted on a CPU machine, compiled on CUDA in fp32):
# RMSNorm with and without Gemma's offset, SwiGLU and GeGLU, RoPE, soft-capped fused cross-entropy.
WITH_TRITON = ("llama", "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_matches_plain_fp32(family, request):
    device = request.getfixturevalue("kernel_device") if family in WITH_TRITON else "cpu"
    model = lora_model(family, device=device)
    inputs = batch(device)
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    set_fast_path(model, True)
    fused, fused_grads = loss_and_grads(model, inputs)
    assert fused.logits is None and plain.logits is not None  # no (B, T, V) logits on the fast path
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) == 7 * 2 * model.config.num_hidden_layers
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_qlora_fused_path_matches_plain():
    """NF4 base weights (bitsandbytes on the CPU), dequantized just in time by the fused functions."""
    model = lora_model("llama", nf4=True)
    assert is_linear4bit(model.get_base_model().model.layers[0].mlp.up_proj.base_layer)
    inputs = batch()
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    set_fast_path(model, True)
    fused, fused_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fused_path_really_runs_the_fused_functions():
    model = lora_model("llama")
    set_fast_path(model, True)
    seen = []
    hooks = [m.register_forward_hook(lambda *a: seen.append(1)) for n, m in model.named_modules()
             if n.endswith(("q_proj", "gate_proj"))]
    out = model(**batch())
    for h in hooks:
        h.remove()
    assert seen == []  # the projection modules were not called; the fused functions read their weights
    # The Python objects of C++ graph nodes (MmBackward0, ...) can be made afresh at each
    # `next_functions` and freed after use, and a new one may reuse a freed one's id: the walk
    # keeps every node it visited alive, so an id names one node (else whole subgraphs were
    # skipped as "seen", as on torch 2.11).
    names, visited, seen_ids, stack = set(), [], set(), [out.loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and id(fn) not in seen_ids:
            visited.append(fn)
            seen_ids.add(id(fn))
            names.add(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    expected = {"LoraProjectionsFunctionBackward", "LoraMLPFunctionBackward"}
    assert expected <= names, f"graph nodes: {sorted(names)}"


def test_logits_on_request_in_eval_and_without_labels():
    model = lora_model("gemma2")  # final-logit soft-capping
    inputs = batch()
    set_fast_path(model, False)
    reference = model(**inputs)
    set_fast_path(model, True)
    asked = model(**inputs, return_logits=True)
    torch.testing.assert_close(asked.logits, reference.logits)
    torch.testing.assert_close(asked.loss, reference.loss)
    no_labels = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(no_labels.logits, reference.logits, rtol=1e-5, atol=1e-5)
    model.eval()
    assert model(**inputs).logits is not None  # evaluation keeps its logits (Trainer metrics)
    with torch.no_grad():
        model.train()
        assert model(**inputs).logits is not None


def test_num_items_in_batch_and_shift_labels_on_the_fused_loss():
    model = lora_model("qwen3")
    inputs = batch()
    n = torch.tensor(11)
    set_fast_path(model, False)
    plain = model(**inputs, num_items_in_batch=n).loss
    set_fast_path(model, True)
    fused = model(**inputs, num_items_in_batch=n).loss
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    fused_shift = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], shift_labels=shifted)
    torch.testing.assert_close(fused_shift.loss, model(**inputs).loss)


def test_greedy_generation_is_unchanged_by_the_fast_path():
    model = lora_model("llama").eval()
    ids = batch()["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    set_fast_path(model, False)
    plain = model.generate(input_ids=ids, **kwargs)
    set_fast_path(model, True)
    torch.testing.assert_close(model.generate(input_ids=ids, **kwargs), plain)


def test_the_plan_fuses_the_loss_unless_the_caller_asks_for_logits(monkeypatch):
    """The loss mode is the plan's, from explicit hints: a training forward with labels fuses the
    loss (no logits) unless the caller asks (`return_logits=True`, or VELOTUNE_RETURN_LOGITS=1
    when it does not say); never in evaluation, without grad or without labels."""
    model = lora_model("llama")
    set_fast_path(model, True)
    monkeypatch.delenv(fast_path.RETURN_LOGITS_ENV, raising=False)
    step = dict(training=True, grad=True, labels=True)
    assert plan_step(model, **step).fused_loss
    assert not plan_step(model, **step, return_logits=True).fused_loss
    assert not plan_step(model, **{**step, "training": False}).fused_loss
    assert not plan_step(model, **{**step, "grad": False}).fused_loss
    assert not plan_step(model, **{**step, "labels": False}).fused_loss
    monkeypatch.setenv(fast_path.RETURN_LOGITS_ENV, "1")
    assert not plan_step(model, **step).fused_loss
    assert plan_step(model, **step, return_logits=False).fused_loss
    assert model(**batch()).logits is not None
    monkeypatch.setenv(fast_path.RETURN_LOGITS_ENV, "maybe")
    with pytest.raises(ValueError, match="VELOTUNE_RETURN_LOGITS='maybe'"):
        plan_step(model, **step)


def test_a_trl_that_reads_logits_gets_them_from_our_trainer(monkeypatch):
    """TRL before its fused LM head (0.24) reads outputs.logits after the loss: velotune's
    SFTTrainer asks the model for them explicitly (no guessing from imported modules)."""
    from velotune.training import trainer as trainer_module

    model = lora_model("llama")
    set_fast_path(model, True)
    seen = []
    monkeypatch.setattr(trainer_module, "TRL_READS_LOGITS", True)
    monkeypatch.setattr(trainer_module.TRLSFTTrainer, "compute_loss",
                        lambda self, model, inputs, **kw: seen.append(model(**inputs).logits))
    trainer = trainer_module.SFTTrainer.__new__(trainer_module.SFTTrainer)  # only compute_loss runs
    trainer.compute_loss(model, dict(batch()))
    assert seen[0] is not None
    monkeypatch.setattr(trainer_module, "TRL_READS_LOGITS", False)
    trainer.compute_loss(model, dict(batch()))
    assert seen[1] is None


def test_trained_lm_head_gets_its_gradient_through_the_fused_loss():
    """lm_head in target_modules trains fully (PEFT modules_to_save): the fused cross-entropy
    must give its copy the plain path's gradient."""
    model = lora_model("llama", target_modules=["q_proj", "v_proj", "lm_head"])
    inputs = batch()
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    set_fast_path(model, True)
    fused, fused_grads = loss_and_grads(model, inputs)
    assert fused.logits is None
    head = [n for n in plain_grads if "lm_head" in n]
    assert head and fused_grads.keys() == plain_grads.keys()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cpu_tensors_never_reach_compiled_kernels():
    """A process whose triton was imported compiled (any CUDA machine; here a fresh interpreter
    without TRITON_INTERPRET) and that sets TRITON_INTERPRET=1 later: the ops' default dispatch
    keeps CPU tensors on the reference; forcing Triton explains the import order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os, torch\n"
        "from velotune.kernels import rms_norm, rms_norm_reference\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x, w = torch.randn(3, 8), torch.randn(8)\n"
        "assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))\n"
        "try:\n"
        "    rms_norm(x, w, 1e-6, use_triton=True)\n"
        "except RuntimeError as e:\n"
        "    print('forced:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forced: TRITON_INTERPRET=1 was set after triton was imported" in done.stdout


def test_plan_is_resolved_per_forward_and_follows_disable_adapter(monkeypatch):
    """The enabled decision carries each layer's fused projections; the layers use them instead of
    looking the modules up again, and a `disable_adapter()` block between forwards is seen."""
    from velotune.fast import lora_linear, lora_mlp

    model = lora_model("llama")
    set_fast_path(model, True)
    decision = plan_step(model)
    decoder = fast_path.find_decoder(model)
    assert len(decision.layers) == len(decoder.layers)
    q = decision.layers[0].qkv[0]
    assert q.lora_A is decoder.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert [p.weight.shape[0] for p in decision.layers[0].mlp] == [
        decoder.config.intermediate_size, decoder.config.intermediate_size, decoder.config.hidden_size]
    inputs = batch()
    lookups = []
    original = lora_linear.projection_of
    for module in (lora_linear, lora_mlp):
        monkeypatch.setattr(module, "projection_of", lambda m: lookups.append(m) or original(m))
    with_adapters = model(**inputs).loss
    with model.disable_adapter():
        assert all(p.lora_A is None for p in plan_step(model).layers[0].qkv)
        without = model(**inputs).loss
        set_fast_path(model, False)
        plain_without = model(**inputs).loss
        set_fast_path(model, True)
    assert lookups == []  # every projection came from the plan
    torch.testing.assert_close(without, plain_without)
    assert not torch.allclose(with_adapters, without)  # the adapters' B are non-zero here
