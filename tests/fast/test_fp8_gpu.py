"""FP8 compute on CUDA (skipped without a GPU with FP8, i.e. compute capability < 8.9): the kernels
compiled at Llama-8B sizes against their PyTorch references, the FP8 GEMMs against a
dequantize-then-fp32 reference, and LoRA training through FP8 bases close to 16-bit.

Run on the GPU machine: `PYTHONPATH=src:tests python -m pytest -q tests/fast/test_fp8_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from tiny.lora import batch, loss_and_grads
from velotune.fast.plan import plan_step, set_fast_path, set_fp8_compute

_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _FP8_GPU, reason="needs a CUDA GPU with FP8 (8.9+)")]


@pytest.fixture(autouse=True)
def _kernels_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336), (300, 20000)])
def test_quantize_rows_at_size(shape):
    """Compiled kernel == reference (one e4m3 step at most where fp32 division rounds differently)."""
    from velotune.kernels.fp8 import quantize_fp8_rows, quantize_fp8_rows_reference

    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * torch.logspace(-3, 2, shape[0], device="cuda")[:, None]).bfloat16()
    col = torch.rand(shape[1], device="cuda") + 0.5
    for c in (None, col):
        y, s = quantize_fp8_rows(x, c)
        y_ref, s_ref = quantize_fp8_rows_reference(x, c)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
        differ = (y.view(torch.uint8) != y_ref.view(torch.uint8)).float().mean().item()
        assert differ < 1e-4, differ
        assert _rel(y.float() * s, y_ref.float() * s_ref) < 1e-3


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_to_fp8_at_size(nested):
    from velotune.kernels import dequantize_nf4_weight
    from velotune.kernels.nf4_fp8 import dequantize_nf4_to_fp8, nf4_to_fp8_reference
    from velotune.quant.linear import to_linear4bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.float32)  # fp32 NF4 values
    module = to_linear4bit(linear, compress_statistics=nested)
    values, scale = dequantize_nf4_to_fp8(module.weight)
    dense = dequantize_nf4_weight(module.weight)  # (out, in) fp32
    torch.testing.assert_close(scale, dense.abs().amax(1) / 448.0, rtol=0, atol=0)
    reference = nf4_to_fp8_reference(dense, 448.0 / dense.abs().amax(1))
    assert torch.equal(values.view(torch.uint8), reference.view(torch.uint8))
    assert _rel(values.float() * scale[:, None], dense) < 0.04  # e4m3's 3 mantissa bits: ~2-3% rms


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (1000, 20000)])
def test_backward_layouts_at_size(shape):
    """The FP8 backward's (in, out) copies at Llama-8B shapes (and one that no tile divides), bit for bit:
    the tiled transpose of an e4m3 weight and NF4 written transposed, each == `.t().contiguous()`."""
    from velotune.kernels.fp8_transpose import transpose_bytes
    from velotune.kernels.nf4_fp8 import dequantize_nf4_to_fp8
    from velotune.quant.fp8 import quantize_weight_fp8
    from velotune.quant.linear import to_linear4bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    values, _ = quantize_weight_fp8(linear.weight)
    assert torch.equal(transpose_bytes(values).view(torch.uint8), values.t().contiguous().view(torch.uint8))
    weight = to_linear4bit(linear, compress_statistics=True).weight
    plain, scale = dequantize_nf4_to_fp8(weight)
    values_t, scale_t = dequantize_nf4_to_fp8(weight, transposed=True)
    assert torch.equal(values_t.view(torch.uint8), plain.t().contiguous().view(torch.uint8))
    assert torch.equal(scale_t, scale)


def test_fp8_gemms_against_dequantized_reference():
    """fp8_linear / fp8_grad_input == the same FP8 values multiplied in fp32 (cuBLAS accumulates in fp32)."""
    from velotune.fast.fp8_matmul import fp8_grad_input, fp8_linear, quantize_input
    from velotune.fast.lora_linear import LoraProjection
    from velotune.kernels.fp8 import quantize_fp8_rows_reference
    from velotune.quant.fp8 import quantize_weight_fp8

    torch.manual_seed(0)
    w = torch.randn(1024, 4096, device="cuda") * 0.02
    values, scale = quantize_weight_fp8(w)
    p = LoraProjection(values, None, None, None, 0.0, scale, fp8=True)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x8, sx = quantize_input(x)
    y = fp8_linear(x8, sx, p, torch.bfloat16)
    w_deq = values.float() * scale[:, None]
    assert _rel(y, (x8.float() * sx) @ w_deq.t()) < 5e-3
    assert _rel(y, x.float() @ w.t()) < 0.06
    g = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    dx = fp8_grad_input(g, p, torch.bfloat16)
    g8, sg = quantize_fp8_rows_reference(g, scale)
    assert _rel(dx, (g8.float() * sg) @ values.float()) < 5e-3
    assert _rel(dx, g.float() @ w) < 0.06


def _model(kind: str):
    from tiny.families import make_config
    from velotune.lora import get_peft_model
    from velotune.models import model_class_for
    from velotune.quant import quantize_model_
    from velotune.quant.fp8 import quantize_model_fp8_

    config = make_config("llama")
    torch.manual_seed(0)
    model = model_class_for(config)(config).to(device="cuda", dtype=torch.bfloat16)
    if kind == "fp8":
        quantize_model_fp8_(model)
    elif kind == "nf4":
        quantize_model_(model, compute_dtype=torch.bfloat16)
    peft = get_peft_model(model, r=8, lora_alpha=16)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return peft.train()


@pytest.mark.parametrize("kind", ["fp8", "nf4", "bf16"])
def test_lora_gradients_through_fp8_gemms_close_to_16bit(kind):
    """The same stored weights with FP8 GEMMs vs 16-bit GEMMs: loss and adapter gradients close."""
    inputs = batch("cuda", B=4, T=64)
    model = _model(kind)
    set_fast_path(model, None)
    out16, grads16 = loss_and_grads(model, inputs)
    set_fp8_compute(model, True)
    plan = plan_step(model, training=True, grad=True, labels=True)
    assert plan.fp8 and "14 of 14 projections" in plan.fp8_reason, plan.fp8_reason
    out8, grads8 = loss_and_grads(model, inputs)
    assert abs(out8.loss.item() - out16.loss.item()) < 0.01 * out16.loss.item()
    assert grads8.keys() == grads16.keys()
    errors = {name: _rel(grads8[name], grads16[name]) for name in grads16}
    assert max(errors.values()) < 0.15, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_from_pretrained_load_in_fp8_trains(tiny_llama_dir):
    from velotune import FastLanguageModel
    from velotune.quant.fp8 import FP8Linear

    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_fp8=True, max_seq_length=64)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, FP8Linear) and layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(model.lm_head, FP8Linear) and model.lm_head.weight.dtype == torch.bfloat16
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    assert plan_step(model, training=True, grad=True, labels=True).fp8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
