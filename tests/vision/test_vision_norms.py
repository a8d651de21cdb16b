"""Vision towers' LayerNorms keep a 16-bit input's dtype where autocast would return fp32 (vision/norms.py): the hook
is on exactly the towers' LayerNorms, it rounds autocast's fp32 output to what the 16-bit norm computes, and it leaves
every other case alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velotune import FastVisionModel
from velotune.vision.families import VISION_ENCODERS
from velotune.vision.norms import keep_input_dtype, keep_tower_norms_16bit

from tiny import vision as tiny


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_the_hook_is_on_the_towers_layer_norms_only(family, vision_folder):
    model, _ = FastVisionModel.from_pretrained(str(vision_folder(family)), load_in_4bit=False, device_map="cpu")
    hooked, others = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            in_tower = any(part in VISION_ENCODERS for part in name.split("."))
            has_hook = keep_input_dtype in module._forward_hooks.values()
            (hooked if has_hook else others).append(name)
            assert has_hook == in_tower, name
    if family in ("mllama", "gemma3", "qwen2_vl"):  # towers built of LayerNorms (Qwen2.5-VL's and Pixtral's: RMSNorm)
        assert hooked, family
    assert keep_tower_norms_16bit(model) == len(hooked)  # a second call adds no second hook
    assert all(list(m._forward_hooks.values()).count(keep_input_dtype) <= 1 for m in model.modules())


def test_autocasts_fp32_output_becomes_the_16bit_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = (torch.randn(5, 64) * 4 + 1).to(torch.bfloat16)
    as_autocast = F.layer_norm(x.float(), (64,), norm.weight.float(), norm.bias.float(), norm.eps)  # CUDA autocast
    out = keep_input_dtype(norm, (x,), as_autocast)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm(x), rtol=1.6e-2, atol=1e-2)  # bf16: one rounding apart at most
    assert keep_input_dtype(norm, (x,), norm(x)) is None  # already 16-bit
    assert keep_input_dtype(norm, (x.float(),), as_autocast) is None  # an fp32 model keeps fp32
