"""Fused linear cross-entropy vs its reference (loss, d hidden, d weight, d bias), and the
reference vs plain full-logit cross-entropy (the model's own loss function)."""

import pytest
import torch
import torch.nn.functional as F

from velotune.kernels import default_chunk_size, fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from velotune.models.loss import causal_lm_loss

from .tolerances import assert_close

# (N, H, V, chunk_size): aligned, and odd sizes with a chunk that does not divide N
SHAPES = [(32, 64, 256, None), (13, 40, 77, 5)]
VARIANTS = {
    "plain": {},
    "softcap": {"softcap": 3.0},
    "num_items": {"num_items_in_batch": 21},
    "bias+sum": {"reduction": "sum", "with_bias": True},
}


def _inputs(N, H, V, dtype, device):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 4).to(dtype)  # logits of size ~4: peaked softmax
    labels = torch.randint(0, V, (N,), device=device)
    labels[::4] = -100
    bias = (torch.randn(V, device=device) * 0.5).to(dtype)
    return hidden, weight, labels, bias


def _run(hidden, weight, labels, bias, options, use_triton, chunk_size=None):
    options = dict(options)
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if options.pop("with_bias", False) else None
    if use_triton:
        options["chunk_size"] = chunk_size
    fn = fused_linear_cross_entropy if use_triton else fused_linear_cross_entropy_reference
    extra = {"use_triton": True} if use_triton else {}
    loss = fn(h, w, labels, bias=b, **options, **extra)
    (loss * 1.5).backward()  # a grad_output other than 1
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_triton_matches_reference(shape, dtype, variant, device):
    N, H, V, chunk = shape
    hidden, weight, labels, bias = _inputs(N, H, V, dtype, device)
    got = _run(hidden, weight, labels, bias, VARIANTS[variant], True, chunk)
    want = _run(hidden, weight, labels, bias, VARIANTS[variant], False)
    assert_close(got[0], want[0], "cross_entropy.loss", dtype)
    for g, w in zip(got[1:], want[1:]):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close(g, w, "cross_entropy.grad", dtype, normalise=True)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_vocab_spans_several_blocks(softcap, device):
    """V > 4096 = the largest BLOCK_V: the online log-sum-exp must rescale its running sum when a
    later block holds a larger logit (rows alternate between the max in block 1 and block 2)."""
    N, H, V = 6, 16, 4096 + 37
    hidden = torch.randn(N, H, device=device)
    hidden[::2, 0] = 6.0  # even rows: the late vocabulary rows below win
    hidden[1::2, 0] = -6.0  # odd rows: the early ones win
    weight = torch.randn(V, H, device=device) * 0.3
    weight[:, 0] = torch.linspace(-2.0, 2.0, V, device=device)
    labels = torch.tensor([5, V - 1, 4096, -100, 100, 4100], device=device)
    got = _run(hidden, weight, labels, None, {"softcap": softcap}, True, 4)
    want = _run(hidden, weight, labels, None, {"softcap": softcap}, False)
    assert_close(got[0], want[0], "cross_entropy.loss", torch.float32)
    for g, w in zip(got[1:3], want[1:3]):
        assert_close(g, w, "cross_entropy.grad", torch.float32, normalise=True)


def test_frozen_weight_and_no_grad(device):
    hidden, weight, labels, _ = _inputs(12, 32, 96, torch.float32, device)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(h, weight, labels, use_triton=True)  # weight frozen: no d weight work
    loss.backward()
    ref_h = hidden.clone().requires_grad_(True)
    fused_linear_cross_entropy_reference(ref_h, weight, labels).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        loss_eval = fused_linear_cross_entropy(hidden, weight, labels, use_triton=True)
    torch.testing.assert_close(loss_eval, loss.detach(), atol=1e-6, rtol=1e-6)


def test_three_dim_hidden_and_tensor_num_items(device):
    hidden, weight, labels, _ = _inputs(2 * 9, 32, 80, torch.float32, device)
    hidden3, labels3 = hidden.view(2, 9, 32), labels.view(2, 9)
    n_items = torch.tensor(40, device=device)
    got = fused_linear_cross_entropy(hidden3, weight, labels3, num_items_in_batch=n_items, use_triton=True)
    want = fused_linear_cross_entropy_reference(hidden, weight, labels, num_items_in_batch=40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("num_items", [None, 17])
def test_reference_is_full_logit_cross_entropy(softcap, num_items):
    """The reference equals the model's loss on full logits (shifted labels, ignore_index, softcap)."""
    B, T, H, V = 2, 7, 24, 50
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    logits = hidden @ weight.T  # (B, T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = causal_lm_loss(logits, labels, num_items_in_batch=num_items)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    got = fused_linear_cross_entropy_reference(
        hidden, weight, shifted, softcap=softcap, num_items_in_batch=num_items
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_default_chunk_size_bounds_the_logits():
    assert default_chunk_size(16384, 4096, 128256) == 512  # 512 x 128256 logits ~ 16384 x 4096 hidden
    assert default_chunk_size(3, 4096, 128256) == 1
    assert default_chunk_size(10, 64, 32) == 16  # small vocab: everything in one chunk


def test_bad_inputs_are_named(device):
    hidden, weight, labels, _ = _inputs(6, 16, 20, torch.float32, device)
    labels[2] = 20
    with pytest.raises(ValueError, match="label 20 at position 2 is outside"):
        fused_linear_cross_entropy(hidden, weight, labels, use_triton=True)
    with pytest.raises(ValueError, match="reduction must be"):
        fused_linear_cross_entropy(hidden, weight, labels.clamp(max=3), reduction="none")
    with pytest.raises(ValueError, match="labels .* must be hidden's leading shape"):
        fused_linear_cross_entropy(hidden, weight, labels[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "softcap"])
def test_real_size_gpu(dtype, variant):
    hidden, weight, labels, bias = _inputs(2048, 4096, 128256, dtype, torch.device("cuda"))
    got = _run(hidden, weight, labels, bias, VARIANTS[variant], True)
    want = _run(hidden, weight, labels, bias, VARIANTS[variant], False)
    assert_close(got[0], want[0], "cross_entropy.loss", dtype)
    for g, w in zip(got[1:3], want[1:3]):
        assert_close(g, w, "cross_entropy.grad", dtype, normalise=True)
