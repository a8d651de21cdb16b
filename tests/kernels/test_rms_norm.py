"""RMSNorm kernel vs its reference (outputs, dx, dweight), and the reference vs the model's norms."""

import pytest
import torch

from velotune.kernels import rms_norm, rms_norm_reference
from velotune.models.layers import GemmaRMSNorm, RMSNorm

from .tolerances import assert_close

SHAPES = [(2, 8, 64), (3, 5, 77), (5, 120, 32)]  # aligned, odd D, many short rows (several tiles and programs)


def _run(x, w, eps, offset, use_triton):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = rms_norm(x, w, eps, offset, use_triton=use_triton)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y, x.grad, w.grad, dy


def _check(shape, dtype, offset, device):
    x = torch.randn(shape, device=device).to(dtype) * 3
    w = (torch.randn(shape[-1], device=device) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
    torch.manual_seed(1)
    y, dx, dw, _ = _run(x, w, 1e-6, offset, use_triton=True)
    torch.manual_seed(1)
    y_ref, dx_ref, dw_ref, _ = _run(x, w, 1e-6, offset, use_triton=False)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y_ref, "rms_norm", dtype)
    assert_close(dx, dx_ref, "rms_norm", dtype)
    assert_close(dw, dw_ref, "rms_norm.dweight", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_triton_matches_reference(shape, dtype, offset, device):
    _check(shape, dtype, offset, device)


def test_non_contiguous_input(device):
    x = torch.randn(6, 4, 32, device=device).transpose(0, 1)  # (4, 6, 32), rows not contiguous
    w = torch.randn(32, device=device)
    y = rms_norm(x, w, 1e-5, use_triton=True)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-4)


def test_reference_matches_model_norms():
    """fp32: the reference is the model's Llama norm (offset 0) and Gemma norm (offset 1)."""
    x = torch.randn(2, 5, 48)
    llama, gemma = RMSNorm(48, eps=1e-5), GemmaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    torch.testing.assert_close(rms_norm_reference(x, llama.weight, 1e-5), llama(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rms_norm_reference(x, gemma.weight, 1e-6, 1.0), gemma(x), atol=1e-6, rtol=1e-6)


def test_bad_weight_shape_is_named():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_real_size_gpu(dtype, offset):
    _check((2, 2048, 4096), dtype, offset, torch.device("cuda"))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_cast_before_scale_is_transformers_llama_norm(weight_dtype):
    """The reference's Llama convention (cast x_hat back, then scale in w's dtype) is transformers'
    LlamaRMSNorm bit for bit in bf16, output dtype included; the default scales in fp32, casts once."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    hf = LlamaRMSNorm(40, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(40) * 0.3 + 1)
    x = (torch.randn(4, 40) * 3).to(torch.bfloat16)
    out = rms_norm_reference(x, hf.weight, 1e-6, cast_before_scale=True)
    assert out.dtype == hf(x).dtype and torch.equal(out, hf(x))
    assert rms_norm_reference(x, hf.weight, 1e-6).dtype == torch.bfloat16
