"""Gradient checkpointing reaches every repeated layer of a vision-language model: transformers' own
`GradientCheckpointingLayer`s through its toggle, and the layers it flags but never checkpoints (Mllama's vision
encoders) through models/foreign_checkpoints.py. A checkpointed vision layer runs again in backward and the
gradients are those of the unchecked model. Under "unsloth" those layers' inputs are offloaded as our decoders'
are (TowerCheckpoint)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer

from velotune import FastVisionModel
from velotune.fast.plan import RuntimeSettings
from velotune.models.decoder import DecoderModel
from velotune.models.foreign_checkpoints import TowerCheckpoint, foreign_layers

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
        _seeded_trainables(model)
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


def _towers_checkpoint(model):
    """The TowerCheckpoint "unsloth" installed on transformers' layers (one per model), and those layers' names."""
    found = {}
    for name, module in model.named_modules():
        functions = (getattr(module, "_gradient_checkpointing_func", None), module.__dict__.get("_velotune_checkpoint"))
        for function in functions:
            if isinstance(function, TowerCheckpoint):
                found[name] = function
    assert found and len({id(f) for f in found.values()}) == 1, found
    return next(iter(found.values())), sorted(found)


def _seeded_trainables(model):
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        # non-zero LoRA B so every LoRA A gets a gradient; Mllama's cross-attention gates opened (they start at 0)
        if "lora_B" in name or name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + 0.5 * ("gate" in name))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_unsloth_mode_offloads_the_towers_layer_inputs_with_equal_gradients(family, vision_folder):
    """use_gradient_checkpointing="unsloth" sends every transformers layer's input (vision towers) through the
    offloading checkpoint (host copies stand in for pinned memory on the CPU: offload_on_cpu) and gives the loss
    and LoRA gradients of the unchecked model."""
    from velotune import UnslothVisionDataCollator

    from .test_collator import _rows

    runs = {}
    for checkpointing in ("unsloth", False):
        model, processor = _load(vision_folder(family), checkpointing)
        _seeded_trainables(model)
        model.train()
        if checkpointing:
            tower, names = _towers_checkpoint(model)
            assert any("vision" in n or "visual" in n for n in names), names
            tower.settings.offload_on_cpu, tower.settings.offload_min_tokens = True, 0
        batch = UnslothVisionDataCollator(model, processor)(_rows()[:1])
        loss = model(**batch).loss
        if checkpointing:
            assert tower.checkpointer.offloaded > 0 and not tower.plain_classes, family
            offloaded = tower.checkpointer.offloaded
        loss.backward()
        runs[checkpointing] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (loss, grads), (plain_loss, plain_grads) = runs["unsloth"], runs[False]
    assert offloaded >= 2
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    vision = [n for n in grads if ("vision" in n or "visual" in n) and "lora_" in n]
    assert vision and all(grads[n] is not None for n in vision), family
    if family != "gemma3":  # transformers' init zeroes Gemma 3's projector weight: no gradient reaches the tiny tower
        assert all(grads[n].abs().sum() > 0 for n in vision), family
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


class _TwoOutputs(GradientCheckpointingLayer):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, hidden, scale=None):
        out = self.linear(hidden)
        return (out, out * 2) if scale is None else out * scale


def test_tower_checkpoint_falls_back_to_torch_checkpoint_where_offloading_would_be_wrong():
    """A layer returning a tuple (remembered for its class), an extra input that needs a gradient, a micro-batch
    below the threshold, a tensor off CUDA: torch's checkpoint, and gradients as without checkpointing."""
    settings = RuntimeSettings(offload_on_cpu=True, offload_min_tokens=0)
    tower = TowerCheckpoint(settings)
    layer = _TwoOutputs().train()
    layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, tower
    x = torch.randn(3, 4, requires_grad=True)

    out, twice = layer(x)  # a tuple: the class falls back, once and for all
    assert type(layer) in tower.plain_classes and tower.checkpointer.offloaded == 0
    (out.sum() + twice.sum()).backward()
    expected = torch.autograd.grad((layer.linear(x) * 3).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)

    tower.plain_classes.clear()
    scale = torch.tensor(2.0, requires_grad=True)
    layer(x, scale=scale).sum().backward()  # `scale` needs a gradient the offloading function would not return
    assert tower.checkpointer.offloaded == 0 and scale.grad is not None and float(scale.grad) != 0
    layer(x, scale=torch.tensor(2.0)).sum().backward()
    assert tower.checkpointer.offloaded == 1
    settings.offload_min_tokens = 4  # 3 rows
    layer(x, scale=torch.tensor(2.0))
    settings.offload_min_tokens, settings.offload_on_cpu = 0, False  # a CPU tensor
    layer(x, scale=torch.tensor(2.0))
    assert tower.checkpointer.offloaded == 1
