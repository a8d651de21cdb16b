"""FP8 compute on the CPU: where the step plan runs it and why not elsewhere, from_pretrained's
FP8 options and their refusals, and LoRA training through FP8 base GEMMs (torch's CPU
`_scaled_mm`, forced with fast_path=True as the fast-path tests do) close to 16-bit."""

from __future__ import annotations

import logging

import pytest
import torch

from tiny.families import make_config
from tiny.lora import batch, loss_and_grads
from velotune.fast.plan import plan_step, set_fast_path, set_fp8_compute
from velotune.quant.fp8 import FP8Linear, quantize_model_fp8_


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _model(kind="fp8", config=None, **lora):
    """Tiny Llama (default init), base quantized as `kind` before LoRA r=4 with non-zero B."""
    from velotune.lora import get_peft_model
    from velotune.models import model_class_for
    from velotune.quant import quantize_model_

    config = config or make_config("llama")
    torch.manual_seed(0)
    model = model_class_for(config)(config)
    if kind == "fp8":
        quantize_model_fp8_(model)
    elif kind == "nf4":
        quantize_model_(model, compute_dtype=torch.float32)
    peft = get_peft_model(model, r=4, lora_alpha=8, **lora)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return peft.train()


def _plan(model):
    return plan_step(model, training=True, grad=True, labels=True)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_fp8_storage_keeps_lm_head_and_embeddings_16bit():
    model = _model("fp8").get_base_model()
    layer = model.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        base = layer.get_submodule(name).base_layer
        assert isinstance(base, FP8Linear) and base.weight.dtype == torch.float8_e4m3fn
        assert base.weight_scale.shape == (base.out_features,) and not base.weight.requires_grad
    assert model.lm_head.weight.dtype == torch.float32 and not isinstance(model.lm_head, FP8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_dtype_conversion_keeps_fp8_values_and_scales():
    """model.to(bfloat16) changes FP8Linear's compute dtype, never its e4m3 values or fp32 scales."""
    module = _model("fp8").get_base_model().model.layers[0].mlp.down_proj.base_layer
    values, scale = module.weight.detach().clone(), module.weight_scale.clone()
    before = module.dequantized(torch.float32)
    module.to(torch.bfloat16)
    assert module.weight.dtype == torch.float8_e4m3fn and module.weight_scale.dtype == torch.float32
    assert torch.equal(module.weight.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(module.weight_scale, scale)
    assert module.compute_dtype == torch.bfloat16
    torch.testing.assert_close(module.dequantized(torch.float32), before)


def test_cpu_plan_says_why_fp8_does_not_run(monkeypatch):
    model = _model("fp8")
    set_fp8_compute(model, True)
    plan = _plan(model)  # on the CPU without fast_path=True the fast path is off, and FP8 with it
    assert not plan.fp8 and not plan.fast
    assert "FP8 compute was asked for but FP8 GEMMs run on the fast path, which is off" in plan.fp8_reason
    assert "the model is on cpu" in plan.fp8_reason
    monkeypatch.setenv("VELOTUNE_REQUIRE_FP8", "1")
    with pytest.raises(RuntimeError, match="VELOTUNE_REQUIRE_FP8=1 but FP8 compute cannot run"):
        _plan(model)


def test_plan_marks_every_projection_when_fp8_can_run():
    model = _model("fp8")
    set_fast_path(model, True)
    assert not _plan(model).fp8  # stored in FP8, but FP8 compute is off: 16-bit GEMMs of the dequantized weights
    set_fp8_compute(model, True)
    plan = _plan(model)
    assert plan.fp8 and plan.fp8_reason.startswith("FP8 (e4m3, row-wise scales) base GEMMs on 14 of 14 projections")
    assert "lm_head, embeddings" in plan.fp8_reason
    assert all(p.fp8 for layer in plan.layers for p in (*layer.qkv, *layer.o, *layer.mlp))


def test_fp8_plans_graph_larger_layers(monkeypatch):
    """FP8 layers are host-bound at sizes where 16-bit ones are not: checkpointed layers replay CUDA graphs up to
    MAX_GRAPHED_ELEMENTS_FP8 with FP8 compute, MAX_GRAPHED_ELEMENTS without."""
    from velotune.fast import plan as plan_module
    from velotune.fast.plan import runtime_settings

    model = _model("fp8")
    set_fast_path(model, True)
    runtime_settings(model).checkpointing = True
    hidden = model.config.hidden_size
    monkeypatch.setattr(plan_module, "MAX_GRAPHED_ELEMENTS", 8 * hidden)
    monkeypatch.setattr(plan_module, "MAX_GRAPHED_ELEMENTS_FP8", 32 * hidden)

    def graphs(tokens):
        return plan_step(model, training=True, grad=True, labels=True, tokens=tokens).graphs

    assert graphs(8) and not graphs(16) and not graphs(32)
    set_fp8_compute(model, True)
    assert graphs(8) and graphs(16) and graphs(32) and not graphs(33)


def test_projection_shapes_not_multiple_of_16_stay_16bit():
    config = make_config("llama")
    config.intermediate_size = 72  # gate/up out, down in: not multiples of 16
    model = _model("fp8", config=config)
    set_fast_path(model, True)
    set_fp8_compute(model, True)
    plan = _plan(model)
    assert plan.fp8 and "on 8 of 14 projections" in plan.fp8_reason
    assert "model.layers.0.mlp.gate_proj: shape (out=72, in=64) is not a multiple of 16" in plan.fp8_reason
    mlp = plan.layers[0].mlp
    assert [p.fp8 for p in mlp] == [False, False, False] and all(p.fp8 for p in plan.layers[0].qkv)
    loss_and_grads(model, batch())  # mixed FP8 / 16-bit projections run


def test_fast_path_refused_by_lora_settings_names_the_reason():
    model = _model("fp8", lora_dropout=0.1)
    set_fast_path(model, True)
    set_fp8_compute(model, True)
    plan = _plan(model)
    assert not plan.fp8 and "lora_dropout=0.1" in plan.fp8_reason


@pytest.mark.parametrize("kind", ["fp8", "nf4", "dense"])
def test_lora_gradients_through_fp8_gemms_close_to_16bit(kind):
    """The same stored weights through FP8 GEMMs and through 16-bit GEMMs: loss within 0.5%,
    every adapter gradient within 15% (relative norm; e4m3 keeps 3 mantissa bits, and a 64-wide
    model averages little of it out; measured 2-8% for FP8 storage, where the 16-bit run uses the
    same FP8 weights, and 3-11% for NF4 and 16-bit storage, where the weights are rounded too)."""
    inputs = batch()
    model = _model(kind)
    set_fast_path(model, True)
    out16, grads16 = loss_and_grads(model, inputs)
    set_fp8_compute(model, True)
    assert _plan(model).fp8
    out8, grads8 = loss_and_grads(model, inputs)
    assert abs(out8.loss.item() - out16.loss.item()) < 5e-3 * out16.loss.item()
    assert grads8.keys() == grads16.keys() and len(grads8) == 28
    errors = {name: _rel(grads8[name], grads16[name]) for name in grads16}
    assert max(errors.values()) < 0.15, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert min(errors.values()) > 0  # the FP8 path really ran


def test_fp8_storage_16bit_compute_equals_the_plain_path():
    """fp8_compute off: the fast path's dequantized weight is FP8Linear's own (plain path) weight."""
    inputs = batch()
    model = _model("fp8")
    set_fast_path(model, False)
    plain, plain_grads = loss_and_grads(model, inputs)
    set_fast_path(model, True)
    fast, fast_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5)


def test_long_sequences_chunked_mlp_with_fp8(monkeypatch):
    """Several MLP chunks (each weight converted once per backward) give the one-chunk result."""
    from velotune.fast import lora_mlp

    inputs = batch(T=12)
    model = _model("nf4")
    set_fast_path(model, True)
    set_fp8_compute(model, True)
    one, one_grads = loss_and_grads(model, inputs)
    monkeypatch.setattr(lora_mlp, "CHUNK_TOKENS", 7)
    many, many_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-4, atol=1e-4)
    for name in one_grads:
        torch.testing.assert_close(many_grads[name], one_grads[name], rtol=1e-3, atol=1e-4)


def test_from_pretrained_on_cpu_gives_a_notice_and_16bit(tiny_llama_dir, caplog, monkeypatch):
    from velotune import FastLanguageModel
    from velotune.fast.plan import runtime_settings

    with caplog.at_level(logging.WARNING, logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_fp8=True, device_map="cpu",
                                                     max_seq_length=64)
    assert "load_in_fp8=True but the model is on cpu; FP8 GEMMs run on CUDA GPUs" in caplog.text
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert not runtime_settings(model).fp8_compute
    monkeypatch.setenv("VELOTUNE_REQUIRE_FP8", "1")
    with pytest.raises(RuntimeError, match="load_in_fp8=True with VELOTUNE_REQUIRE_FP8=1, but the model is on cpu"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_fp8=True, device_map="cpu")


@pytest.mark.parametrize("option", ["load_in_fp8", "fp8_compute"])
def test_fp8_with_load_in_8bit_is_an_error_naming_both(tiny_llama_dir, option):
    from velotune import FastLanguageModel

    with pytest.raises(ValueError, match=f"{option}=True and load_in_8bit=True: choose one"):
        FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_8bit=True, device_map="cpu",
                                          **{option: True})
