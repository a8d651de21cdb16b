"""Decode attention with RoPE and the cache write fused (kernels/decode_attention.py) against its
reference (rope_reference, index_copy_ into the cache, SDPA with the mask): output and the cache
after the call, one row and several, grouped-query heads, a head size that is not a power of two,
partial rotary, a cache length that is not a multiple of the kernel's chunk, padding slots and a
sliding-window-like mask."""

import pytest
import torch

from velotune.kernels.decode_attention import decode_attention, decode_attention_reference

from .tolerances import assert_close

CASES = [(1, 4, 2, 16, 70, 2), (2, 4, 2, 24, 128, 3)]  # B, H, Hkv, D, L, cache rows


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, Hkv, D, L, rows", CASES, ids=["b1-odd", "b2-aligned"])
def test_decode_attention(B, H, Hkv, D, L, rows, dtype, rope, device):
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(B, Hkv, 1, D, device=device, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(rows, Hkv, L, D, device=device, dtype=dtype) for _ in range(2))
    slot = torch.tensor([L - 5], device=device)
    j = torch.arange(L, device=device)
    valid = torch.rand(B, L, device=device) > 0.3  # padding slots
    mask = (valid & (j <= slot) & (slot - j < L - 20)) | (j == slot)  # causal, windowed, own slot visible
    mask = mask[:, None, None, :]
    cos_sin = None
    if rope:  # partial rotary on the first 16 dims; one position per row (B rows) or shared (b1)
        angles = torch.randn(B if B > 1 else 1, 1, 8, device=device)
        cos_sin = (torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = decode_attention_reference(q, k_new, v_new, want_k, want_v, mask, slot, 0.3, cos_sin)
    got = decode_attention(q, k_new, v_new, k_cache, v_cache, mask, slot, 0.3, cos_sin, use_triton=True)
    assert_close(got, want, "decode_attention", dtype)
    assert torch.equal(v_cache, want_v)  # the new v written at the slot, nothing else
    # the rotated k: one rounding in the kernel, the reference's rotation rounds after each op
    assert_close(k_cache, want_k, "decode_attention", dtype)
    assert torch.equal(k_cache[:, :, :-5], want_k[:, :, :-5])


def test_bad_shapes_are_named(device):
    q = torch.randn(1, 4, 2, 16, device=device)  # two query tokens: not a decode step
    cache = torch.zeros(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(q, q[:, :2, :1], q[:, :2, :1], cache, cache, torch.ones(1, 1, 1, 8, dtype=torch.bool),
                         torch.tensor([0]), 1.0)
