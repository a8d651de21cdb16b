"""Qwen-VL vision attention grouped by chunk length (models/vision_attention.py) equals transformers' per-chunk
attention: the tower's output and the gradients (fp32, 1e-5) for one image, for two images of different sizes
(windows of several lengths, one full-attention layer), through LoRA on `qkv` / `proj`; the SDPA calls a layer
are one per distinct length; the composite loaded by FastVisionModel has it installed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from velotune import FastVisionModel
from velotune.models.vision_attention import GatherRows, ScatterRows, group_chunks, install_grouped_attention

# Two images (t, h, w in patches): 6x10 and 4x4. With window_size 32 (2x2 merged units of 2x2 patches) the first
# has windows of 16, 8 (edge strips) and 4 (corner) patches, the second two... of 16: lengths {16, 8, 4}.
GRIDS = {"one": [[1, 6, 10]], "two": [[1, 6, 10], [1, 4, 4]]}


def _tower(family: str):
    torch.manual_seed(0)
    common = dict(depth=3, hidden_size=32, num_heads=2, patch_size=8, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3)
    if family == "qwen2_vl":
        config = Qwen2VLConfig(vision_config=dict(embed_dim=32, mlp_ratio=2, **common)).vision_config
        tower = Qwen2VisionTransformerPretrainedModel._from_config(config, dtype=torch.float32)
    else:
        config = Qwen2_5_VLConfig(vision_config=dict(intermediate_size=64, out_hidden_size=32, window_size=32,
                                                     fullatt_block_indexes=[1], **common)).vision_config
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=torch.float32)
    for p in tower.parameters():  # transformers' init leaves some at zero/one; random weights test more
        with torch.no_grad():
            p.normal_(0, 0.2)
    return tower.train()


def _inputs(grid):
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(1))
    return pixels.requires_grad_(), grid


class _CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def _run(tower, grid):
    pixels, grid_thw = _inputs(grid)
    counter = _CountSDPA()
    with counter:
        out = tower(pixels, grid_thw=grid_thw).pooler_output  # (N, C)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    return out.detach(), pixels.grad, grads, counter.calls


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("images", ["one", "two"])
def test_grouped_attention_equals_transformers(family, images):
    reference = _tower(family)
    ours = copy.deepcopy(reference)
    assert install_grouped_attention(ours) == 3
    ref_out, ref_pixel_grad, ref_grads, ref_calls = _run(reference, GRIDS[images])
    out, pixel_grad, grads, calls = _run(ours, GRIDS[images])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pixel_grad, ref_pixel_grad, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    # one SDPA call per distinct chunk length and layer, against one per chunk
    sizes = [int(h * w) for _, h, w in GRIDS[images]]
    if family == "qwen2_vl":
        expected = 3 * len(set(sizes))
    else:  # two windowed layers of lengths {16, 8, 4}, one full-attention layer over the images
        expected = 2 * 3 + len(set(sizes))
    assert calls == expected, (calls, ref_calls)
    assert ref_calls > calls if family == "qwen2_5_vl" else ref_calls == calls  # Qwen2-VL: one chunk an image


def test_group_chunks_orders_and_restores_rows():
    cu = torch.tensor([0, 4, 6, 10, 11, 13])  # lengths 4, 2, 4, 1, 2
    groups = group_chunks(cu, 13)
    assert groups.spans == ((0, 2, 4), (8, 2, 2), (12, 1, 1))
    assert groups.perm.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 11, 12, 10]
    # the groups' rows gathered, then scattered back: the rows as they were; the gradients too, each backward one
    # tensor (GatherRows / ScatterRows)
    sizes = (8, 4, 1)
    x = torch.randn(13, 3, requires_grad=True)
    parts = GatherRows.apply(x, groups.perm, sizes)
    assert [p.shape[0] for p in parts] == list(sizes) and torch.equal(parts[1], x[[4, 5, 11, 12]].detach())
    back = ScatterRows.apply(groups.perm, sizes, *parts)
    assert torch.equal(back, x)
    weights = torch.randn(13, 3)
    (grad,) = torch.autograd.grad((back * weights).sum(), x, retain_graph=True)
    assert torch.equal(grad, weights)
    (grad,) = torch.autograd.grad(parts[1].sum(), x)  # one part alone: zeros on the other rows
    assert torch.equal(grad, torch.zeros(13, 3).index_fill(0, torch.tensor([4, 5, 11, 12]), 1.0))
    same = group_chunks(torch.tensor([0, 3, 6]), 6)
    assert same.perm is None and same.spans == ((0, 2, 3),)
    with pytest.raises(ValueError, match="cu_seqlens spans rows 0..6, the hidden states have 7"):
        group_chunks(torch.tensor([0, 3, 6]), 7)


def test_loaded_model_runs_grouped_attention_through_lora(vision_folder):
    model, _ = FastVisionModel.from_pretrained(str(vision_folder("qwen2_5_vl")), load_in_4bit=False,
                                               device_map="cpu", dtype=torch.float32)
    visual = model.model.visual
    assert all("forward" in block.attn.__dict__ for block in visual.blocks)
    model = FastVisionModel.get_peft_model(model, r=4, finetune_language_layers=False)
    targets = [n for n, m in model.named_modules() if n.endswith(("attn.qkv", "attn.proj")) and hasattr(m, "lora_A")]
    assert len(targets) == 2 * len(visual.blocks)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                parameter.normal_(0, 0.2)
    model.train()
    pixels, grid_thw = _inputs([[1, 4, 6], [1, 2, 2]])
    outputs = []
    for grouped in (True, False):
        if not grouped:  # transformers' class forward on the same (LoRA-wrapped) modules
            for block in visual.blocks:
                del block.attn.forward
        model.zero_grad()
        out = visual(pixels, grid_thw=grid_thw).pooler_output
        out.pow(2).sum().backward()
        lora_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and "visual" in n}
        outputs.append((out.detach(), lora_grads))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    qkv_grads = [n for n in outputs[0][1] if "attn.qkv.lora_A" in n]
    assert qkv_grads and all(outputs[0][1][n].abs().sum() > 0 for n in qkv_grads)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_on_cuda_equals_transformers(dtype):
    """On the GPU, Qwen2.5-VL-7B's head size (80) and window (112 px: windows of 64, 32 and 16 patches), two
    images of 504x392 and 280x280 px: SDPA's CUDA kernels batched over the chunks against one call a chunk."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=dict(
        depth=2, hidden_size=160, num_heads=2, intermediate_size=256, out_hidden_size=64, patch_size=14,
        temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1])).vision_config
    reference = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype).cuda().train()
    ours = copy.deepcopy(reference)
    install_grouped_attention(ours)
    grid = torch.tensor([[1, 36, 28], [1, 20, 20]], device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda", dtype=dtype)
    results = []
    for tower in (reference, ours):
        x = pixels.clone().requires_grad_()
        out = tower(x, grid_thw=grid).pooler_output
        out.float().pow(2).mean().backward()
        results.append((out.float(), x.grad.float(), {n: p.grad.float() for n, p in tower.named_parameters()}))
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[1][0], results[0][0], **tolerance)
    torch.testing.assert_close(results[1][1], results[0][1], **tolerance)
    for name, grad in results[0][2].items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (results[1][2][name] - grad).abs().max() / scale < (1e-4 if dtype == torch.float32 else 3e-2), name
