"""Chunked per-token log-probabilities vs the reference (values, d hidden, d weight), and the
reference vs TRL-style full-logit log-softmax."""

import pytest
import torch

from velotune.kernels import chunked_logprobs, chunked_logprobs_reference

from .tolerances import assert_close

# (B, T, H, V, chunk_size): aligned; odd sizes with chunks that do not divide B*T
SHAPES = [(2, 8, 64, 256, None), (3, 5, 40, 77, 4)]


def _run(hidden, weight, ids, temperature, use_triton, chunk_size=None):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    if use_triton:
        logp = chunked_logprobs(h, w, ids, temperature=temperature, chunk_size=chunk_size, use_triton=True)
    else:
        logp = chunked_logprobs_reference(h, w, ids, temperature=temperature)
    g = torch.randn(logp.shape, generator=torch.Generator(device=logp.device).manual_seed(7), device=logp.device)
    (logp * g).sum().backward()  # per-token upstream gradients, as a policy-gradient loss gives
    return logp.detach(), h.grad, w.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_triton_matches_reference(shape, dtype, temperature, device):
    B, T, H, V, chunk = shape
    hidden = torch.randn(B, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 3).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device)
    got = _run(hidden, weight, ids, temperature, True, chunk)
    want = _run(hidden, weight, ids, temperature, False)
    assert got[0].dtype == torch.float32 and got[0].shape == (B, T)
    assert_close(got[0], want[0], "logprobs", dtype)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == dtype
        assert_close(g, w, "logprobs.grad", dtype, normalise=True)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_vocab_spans_several_blocks(temperature, device):
    """V > 4096 = the largest BLOCK_V: the online log-sum-exp must rescale its running sum when a
    later block holds a larger logit; ids hit both blocks and the last (partial) one."""
    H, V = 16, 4096 + 37
    hidden = torch.randn(1, 6, H, device=device)
    hidden[0, ::2, 0] = 6.0  # even tokens: the late vocabulary rows below win
    hidden[0, 1::2, 0] = -6.0  # odd tokens: the early ones win
    weight = torch.randn(V, H, device=device) * 0.3
    weight[:, 0] = torch.linspace(-2.0, 2.0, V, device=device)
    ids = torch.tensor([[5, V - 1, 4096, 0, 100, 4100]], device=device)
    got = _run(hidden, weight, ids, temperature, True, 4)
    want = _run(hidden, weight, ids, temperature, False)
    assert_close(got[0], want[0], "logprobs", torch.float32)
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, "logprobs.grad", torch.float32, normalise=True)


def test_reference_is_full_log_softmax():
    hidden, weight = torch.randn(2, 6, 16), torch.randn(30, 16)
    ids = torch.randint(0, 30, (2, 6))
    logits = (hidden @ weight.T) / 0.5
    want = torch.stack([torch.log_softmax(row, -1)[range(6), i] for row, i in zip(logits, ids)])
    torch.testing.assert_close(chunked_logprobs_reference(hidden, weight, ids, temperature=0.5), want)


def test_bad_ids_are_named(device):
    hidden, weight = torch.randn(1, 4, 8, device=device), torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match=r"token id 10 at \(0, 2\) is outside \[0, 10\)"):
        chunked_logprobs(hidden, weight, torch.tensor([[1, 2, 10, 3]], device=device))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_logprobs(hidden, weight, torch.zeros(1, 4, dtype=torch.long, device=device), temperature=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_size_gpu(dtype):
    hidden = torch.randn(2, 1024, 4096, device="cuda").to(dtype)
    weight = (torch.randn(128256, 4096, device="cuda") * 4096**-0.5 * 3).to(dtype)
    ids = torch.randint(0, 128256, (2, 1024), device="cuda")
    got, want = _run(hidden, weight, ids, 0.9, True), _run(hidden, weight, ids, 0.9, False)
    assert_close(got[0], want[0], "logprobs", dtype)
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, "logprobs.grad", dtype, normalise=True)
