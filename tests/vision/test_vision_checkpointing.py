"""Gradient checkpointing reaches every repeated layer of a vision-language model: transformers' own
`GradientCheckpointingLayer`s through its toggle, and the layers it flags but never checkpoints (Mllama's vision
encoders) through models/foreign_checkpoints.py. A checkpointed vision layer runs again in backward and the
gradients are those of the unchecked model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer

from velotune import FastVisionModel
from velotune.models.decoder import DecoderModel
from velotune.models.foreign_checkpoints import foreign_layers

from tiny import vision as tiny


def _load(folder, checkpointing):
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                       dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=checkpointing), processor


def _repeated_layers(model):
    """(name, layer) of every ModuleList element with children outside our decoder."""
    own = [name for name, m in model.named_modules() if isinstance(m, DecoderModel)]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(o + ".") for o in own):
            for index, layer in enumerate(module):
                if any(True for _ in layer.children()) and not isinstance(layer, DecoderModel):
                    yield f"{name}.{index}", layer


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_transformers_layer_is_checkpointed(family, vision_folder):
    model, _ = _load(vision_folder(family), True)
    layers = dict(_repeated_layers(model))
    assert any("vision" in n or "visual" in n for n in layers), sorted(layers)
    for name, layer in layers.items():
        assert layer.gradient_checkpointing is True, name
        assert isinstance(layer, GradientCheckpointingLayer) or "forward" in layer.__dict__, name
    foreign = [name for name, _ in foreign_layers(model, own=(DecoderModel,))]
    if family == "mllama":  # its vision encoders' layers are plain modules under a flag transformers never reads
        assert foreign and all(".vision_model." in n for n in foreign), foreign
        assert len(foreign) == 3  # two local layers, one global
    else:
        assert foreign == []


def _mllama_batch(processor):
    image = Image.new("RGB", (24, 20), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


def test_mllama_vision_layers_recompute_in_backward_with_equal_gradients(vision_folder):
    folder = vision_folder("mllama")
    runs = {}
    for checkpointing in (True, False):
        model, processor = _load(folder, checkpointing)
        generator = torch.Generator().manual_seed(0)
        for name, parameter in model.named_parameters():
            # non-zero LoRA B, so every LoRA A gets a gradient too; open cross-attention gates (Mllama starts them
            # at 0, which would leave the vision tower without gradients)
            if "lora_B" in name or name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                with torch.no_grad():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + 0.5 * ("gate" in name))
        model.train()
        layer = model.get_base_model().model.vision_model.transformer.layers[0]
        assert getattr(layer, "gradient_checkpointing", False) is checkpointing
        calls = []
        # the layer's first module: torch's checkpoint stops recomputing once backward has what it needs, so the
        # layer's last modules may not run again
        hook = layer.input_layernorm.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        loss = model(**_mllama_batch(processor)).loss
        forward_calls = len(calls)
        loss.backward()
        hook.remove()
        runs[checkpointing] = (forward_calls, len(calls), loss.detach(),
                               {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert runs[True][:2] == (1, 2)  # recomputed in backward
    assert runs[False][:2] == (1, 1)
    torch.testing.assert_close(runs[True][2], runs[False][2], rtol=0, atol=0)
    with_ckpt, without = runs[True][3], runs[False][3]
    assert with_ckpt.keys() == without.keys()
    vision = [n for n in with_ckpt if ".vision_model.transformer.layers." in n]
    assert vision and all(with_ckpt[n] is not None and with_ckpt[n].abs().sum() > 0 for n in vision)
    for name in with_ckpt:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-7, msg=name)
