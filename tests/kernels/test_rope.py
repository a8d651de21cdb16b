"""RoPE kernel vs its reference (q, k and their gradients through the projection views), the
reference vs the model's apply function, and the in-place contract."""

import pytest
import torch
from transformers import LlamaConfig, Phi3Config

from velotune.kernels import apply_rope, apply_rope_reference
from velotune.models.rope import RotaryEmbedding

from .tolerances import assert_close


def _llama3_config(heads: int, kv_heads: int, head_dim: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=64,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    )  # fmt: skip


def _partial_config(heads: int, kv_heads: int, head_dim: int) -> Phi3Config:
    return Phi3Config(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.6},
    )  # fmt: skip


# (B, T, Hq, Hk, Dh, config builder): aligned full rotary; odd sizes with partial rotary R=24 of 40
CASES = [(2, 8, 4, 2, 64, _llama3_config), (1, 7, 3, 1, 40, _partial_config)]


def _setup(case, dtype, device):
    B, T, Hq, Hk, Dh, make = case
    config = make(Hq, Hk, Dh)
    x = torch.randn(B, T, 16, device=device, dtype=dtype)
    wq = torch.randn(Hq * Dh, 16, device=device, dtype=dtype) * 0.3
    wk = torch.randn(Hk * Dh, 16, device=device, dtype=dtype) * 0.3
    positions = torch.arange(T, device=device).expand(B, T) + torch.arange(B, device=device)[:, None] * 5
    cos, sin = RotaryEmbedding(config).to(device)(x, positions)  # (B, T, R) in x's dtype
    return x, wq, wk, cos, sin


def _forward_backward(case, x, wq, wk, cos, sin, use_triton):
    """q/k as the attention builds them: transposed views of the projections; grads back to x."""
    B, T, Hq, Hk, Dh, _ = case
    x = x.detach().clone().requires_grad_(True)
    q = (x @ wq.T).view(B, T, Hq, Dh).transpose(1, 2)  # (B, Hq, T, Dh), non-contiguous view
    k = (x @ wk.T).view(B, T, Hk, Dh).transpose(1, 2)  # (B, Hk, T, Dh)
    q, k = apply_rope(q, k, cos, sin, use_triton=use_triton)
    gen = torch.Generator(device=x.device).manual_seed(3)
    dq = torch.randn(q.shape, generator=gen, device=x.device).to(x.dtype)
    dk = torch.randn(k.shape, generator=gen, device=x.device).to(x.dtype)
    ((q.float() * dq.float()).sum() + (k.float() * dk.float()).sum()).backward()
    return q.detach(), k.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=["llama3-aligned", "partial-odd"])
def test_triton_matches_reference(case, dtype, device):
    x, wq, wk, cos, sin = _setup(case, dtype, device)
    q, k, dx = _forward_backward(case, x, wq, wk, cos, sin, use_triton=True)
    q_ref, k_ref, dx_ref = _forward_backward(case, x, wq, wk, cos, sin, use_triton=False)
    assert_close(q, q_ref, "rope", dtype)
    assert_close(k, k_ref, "rope", dtype)
    assert_close(dx, dx_ref, "rope", dtype)


@pytest.mark.parametrize("case", CASES, ids=["llama3-aligned", "partial-odd"])
def test_direct_gradients_on_leaves(case, device):
    """Leaves that require grad: out of place (autograd forbids in place), grads equal the reference."""
    B, T, Hq, Hk, Dh, _ = case
    _, _, _, cos, sin = _setup(case, torch.float32, device)
    q0 = torch.randn(B, Hq, T, Dh, device=device)
    k0 = torch.randn(B, Hk, T, Dh, device=device)
    grads = []
    for use_triton in (True, False):
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        qo, ko = apply_rope(q, k, cos, sin, use_triton=use_triton)
        (qo.square().sum() + (ko * 3).sum()).backward()
        grads.append((qo.detach(), ko.detach(), q.grad, k.grad))
        assert torch.equal(q.detach(), q0)  # leaves untouched
    for got, want in zip(*grads):
        assert_close(got, want, "rope", torch.float32)


def test_in_place_on_triton_path(device):
    B, T, H, Dh = 1, 5, 2, 32
    _, _, _, cos, sin = _setup((B, T, H, H, Dh, _llama3_config), torch.float32, device)
    q, k = torch.randn(B, H, T, Dh, device=device), torch.randn(B, H, T, Dh, device=device)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    q_out, k_out = apply_rope(q, k, cos, sin, use_triton=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-4)
    q2 = torch.randn(B, H, T, Dh, device=device)
    q2_out, _ = apply_rope(q2, k_ref.clone(), cos, sin, inplace=False, use_triton=True)
    assert q2_out.data_ptr() != q2.data_ptr()


@pytest.mark.parametrize("case", CASES, ids=["llama3-aligned", "partial-odd"])
def test_reference_is_transformers_rotation(case):
    """The one RoPE reference (also the models' plain path) equals transformers' Llama rotation on
    the rotated features; partial rotary passes the rest through unchanged."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, Hq, Hk, Dh, _ = case
    _, _, _, cos, sin = _setup(case, torch.float32, "cpu")
    q, k = torch.randn(B, Hq, T, Dh), torch.randn(B, Hk, T, Dh)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    R = cos.shape[-1]
    q_hf, k_hf = apply_rotary_pos_emb(q[..., :R], k[..., :R], cos, sin)
    torch.testing.assert_close(q_ref, torch.cat((q_hf, q[..., R:]), dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(k_ref, torch.cat((k_hf, k[..., R:]), dim=-1), rtol=0, atol=0)


def test_bad_shapes_are_named():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cos/sin must both be"):
        apply_rope(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="must be even"):
        apply_rope(q, k, torch.randn(1, 4, 10), torch.randn(1, 4, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_size_gpu(dtype):
    case = (2, 2048, 32, 8, 128, _llama3_config)
    x, wq, wk, cos, sin = _setup(case, dtype, torch.device("cuda"))
    q, k, dx = _forward_backward(case, x, wq, wk, cos, sin, use_triton=True)
    q_ref, k_ref, dx_ref = _forward_backward(case, x, wq, wk, cos, sin, use_triton=False)
    assert_close(q, q_ref, "rope", dtype)
    assert_close(k, k_ref, "rope", dtype)
    if dtype == torch.float32:
        assert_close(dx, dx_ref, "rope", dtype)
        return
    # In bf16, dx sums 5120 products of rotated gradients that the kernel rounds once (fp32 math) and
    # the reference rounds per op, so the two differ by a few ulps of dx's largest values even where dx
    # is near 0. Judge both against the fp32 computation instead: the kernel must be as accurate.
    *_, dx_true = _forward_backward(case, x.float(), wq.float(), wk.float(), cos.float(), sin.float(), use_triton=False)
    kernel_err = (dx.float() - dx_true).norm() / dx_true.norm()
    reference_err = (dx_ref.float() - dx_true).norm() / dx_true.norm()
    assert kernel_err <= 1.1 * reference_err + 1e-4, (kernel_err, reference_err)
