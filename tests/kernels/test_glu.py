"""SwiGLU / GeGLU kernels vs their references (output, d gate, d up), and the references vs the
activations the model uses (transformers' ACT2FN)."""

import pytest
import torch
from transformers.activations import ACT2FN

from velotune.kernels import geglu, geglu_reference, swiglu, swiglu_reference

from .tolerances import assert_close

SHAPES = [(2, 8, 128), (3, 7, 77)]  # aligned, odd
OPS = {
    "swiglu": lambda g, u, t: swiglu(g, u, use_triton=t),
    "geglu_tanh": lambda g, u, t: geglu(g, u, "tanh", use_triton=t),
    "geglu_exact": lambda g, u, t: geglu(g, u, "none", use_triton=t),
}


def _run(op, gate, up, use_triton):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    out = OPS[op](gate, up, use_triton)
    dout = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(5), device=out.device)
    out.backward(dout.to(out.dtype))
    return out, gate.grad, up.grad


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(op, shape, dtype, device):
    gate = (torch.randn(shape, device=device) * 3).to(dtype)  # wide range: both tails of the activation
    up = torch.randn(shape, device=device).to(dtype)
    got = _run(op, gate, up, use_triton=True)
    want = _run(op, gate, up, use_triton=False)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, w, "glu", dtype)


def test_non_contiguous_halves_of_a_fused_projection(device):
    gate_up = torch.randn(4, 6, 2 * 40, device=device)
    gate, up = gate_up.chunk(2, dim=-1)  # views with row stride 80
    torch.testing.assert_close(swiglu(gate, up, use_triton=True), swiglu_reference(gate, up), atol=1e-5, rtol=1e-4)


def test_references_are_the_models_activations():
    gate, up = torch.randn(5, 33) * 3, torch.randn(5, 33)
    assert torch.equal(swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)
    assert torch.equal(geglu_reference(gate, up, "tanh"), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    assert torch.equal(geglu_reference(gate, up, "none"), ACT2FN["gelu"](gate) * up)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(torch.randn(2, 3), torch.randn(2, 3), approximate="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_size_gpu(op, dtype):
    gate = (torch.randn(4096, 14336, device="cuda") * 3).to(dtype)
    up = torch.randn(4096, 14336, device="cuda").to(dtype)
    for g, w in zip(_run(op, gate, up, True), _run(op, gate, up, False)):
        assert_close(g, w, "glu", dtype)


@pytest.mark.parametrize("op,kind", [("swiglu", "silu"), ("geglu_tanh", "gelu_tanh"), ("geglu_exact", "gelu_none")])
@pytest.mark.parametrize("use_triton", [True, False])
def test_direct_backward_equals_the_autograd_backward(op, kind, use_triton, device):
    """gated_activation_backward (the fused MLP's backward calls it without autograd) gives bit for bit what
    backpropagating through the op gives, on each path."""
    from velotune.kernels.glu import gated_activation_backward

    gate = (torch.randn(3, 7, 77, device=device) * 3).to(torch.bfloat16)
    up = torch.randn(3, 7, 77, device=device).to(torch.bfloat16)
    out, want_dgate, want_dup = _run(op, gate, up, use_triton)
    dout = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(5), device=out.device)
    dgate, dup = gated_activation_backward(gate, up, dout.to(out.dtype), kind, use_triton=use_triton)
    assert torch.equal(dgate, want_dgate) and torch.equal(dup, want_dup)
    # overwrite=True: the same values, written over gate and up (the recomputing MLP backward's two buffers)
    dgate, dup = gated_activation_backward(gate, up, dout.to(out.dtype), kind, use_triton=use_triton, overwrite=True)
    assert dgate.data_ptr() == gate.data_ptr() and dup.data_ptr() == up.data_ptr()
    assert torch.equal(dgate, want_dgate) and torch.equal(dup, want_dup)
