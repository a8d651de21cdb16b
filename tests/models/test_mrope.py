"""Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): our cos/sin tables equal transformers' text-model rotary
on random (3, B, T) position ids, and text-only (B, T) ids mean three equal axes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from velotune.models.rope import RotaryEmbedding


def _config(sections, head_dim=16, theta=10000.0):
    heads = 2
    return Qwen2VLTextConfig(hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=1,
                             intermediate_size=8, num_hidden_layers=1, vocab_size=32,
                             rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": theta})


@pytest.mark.parametrize("reference_cls", [Qwen2VLRotaryEmbedding, Qwen2_5_VLRotaryEmbedding])
@pytest.mark.parametrize("sections,head_dim", [([2, 3, 3], 16), ([1, 2, 2], 10)])
def test_mrope_tables_equal_transformers(reference_cls, sections, head_dim):
    config = _config(sections, head_dim, theta=1e6)
    ours, theirs = RotaryEmbedding(config), reference_cls(config)
    torch.manual_seed(0)
    positions = torch.randint(0, 300, (3, 2, 7))  # (3, B, T): the three axes differ, as on image tokens
    x = torch.randn(2, 7, head_dim)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = ours(x.to(dtype), positions)
        ref_cos, ref_sin = theirs(x.to(dtype), positions)
        assert cos.shape == (2, 7, head_dim) and cos.dtype == dtype
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_text_positions_are_three_equal_axes():
    rope = RotaryEmbedding(_config([2, 3, 3]))
    positions = torch.arange(5)[None].expand(2, -1)  # (B, T)
    x = torch.randn(2, 5, 16)
    cos, sin = rope(x, positions)
    cos3, sin3 = rope(x, positions[None].expand(3, -1, -1))
    torch.testing.assert_close(cos, cos3, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin3, rtol=0, atol=0)
    plain = RotaryEmbedding(_config(None))  # the same frequencies without sections: ordinary RoPE
    torch.testing.assert_close(plain(x, positions)[0], cos, rtol=0, atol=0)


def test_sections_that_do_not_cover_the_head_are_refused():
    rope = RotaryEmbedding(_config([2, 2, 2]))  # 6 != 16 / 2
    with pytest.raises(ValueError, match=r"mrope_section \[2, 2, 2\] sums to 6 .* 8 frequencies"):
        rope(torch.randn(1, 3, 16), torch.zeros(3, 1, 3, dtype=torch.long))


def test_three_axis_positions_on_an_ordinary_rope_are_refused():
    rope = RotaryEmbedding(_config(None))
    with pytest.raises(ValueError, match="mrope_section"):
        rope(torch.randn(1, 3, 16), torch.zeros(3, 1, 3, dtype=torch.long))
