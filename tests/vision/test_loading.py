"""FastVisionModel.from_pretrained: transformers' classes, the same outputs as transformers' model of the
same weights, NF4 on the text decoder only, and the bad inputs of issue 20."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, ProcessorMixin

from velotune import FastVisionModel
from velotune.models.decoder import DecoderModel
from velotune.models.vision_lm import own_decoder_class
from velotune.quant import is_linear4bit
from velotune.vision.families import LANGUAGE, family_of, group_of

from tiny import vision as tiny


def _batch(processor):
    image = Image.new("RGB", (40, 28), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_loads_transformers_class_with_equal_logits_and_loss(family, vision_folder):
    folder = vision_folder(family)
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu")
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(processor, ProcessorMixin)
    if own_decoder_class(model.config) is None:
        assert type(model) is type(reference)
    else:  # velotune's class of the same name over transformers' vision parts, our decoder as language model
        assert isinstance(model, type(reference)) and type(model).__name__ == type(reference).__name__
        assert isinstance(model.model.language_model, DecoderModel)
    batch = _batch(processor)
    with torch.no_grad():
        ours = model(**batch, labels=batch["input_ids"])
        theirs = reference(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())  # adapters decide what trains


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama", "gemma3"])
def test_nf4_on_the_text_decoder_only(family, vision_folder, caplog):
    with caplog.at_level(logging.INFO, logger="velotune"):
        model, processor = FastVisionModel.from_pretrained(str(vision_folder(family)), load_in_4bit=True,
                                                           device_map="cpu")
    spec = family_of(model.config.model_type)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or is_linear4bit(module):
            in_text_decoder = group_of(name, spec).component == LANGUAGE
            assert is_linear4bit(module) == in_text_decoder, name
    assert "vision encoder, projector and lm_head stay" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(**_batch(processor)).logits).all()


def test_qwen_processor_without_torchvision_is_image_only(vision_folder, caplog):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: the full processor loads")
    with caplog.at_level(logging.WARNING, logger="velotune"):
        _, processor = FastVisionModel.from_pretrained(str(vision_folder("qwen2_5_vl")), load_in_4bit=False,
                                                       device_map="cpu")
    assert "torchvision is not installed" in caplog.text
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert _batch(processor)["pixel_values"].shape[0] > 0


def test_text_only_model_points_to_fast_language_model(tmp_path):
    from tiny.folders import write_tiny_llama

    write_tiny_llama(tmp_path / "llama")
    with pytest.raises(ValueError, match="text-only model.*FastLanguageModel"):
        FastVisionModel.from_pretrained(str(tmp_path / "llama"), device_map="cpu")


def test_bad_checkpointing_value(vision_folder):
    with pytest.raises(ValueError, match="use_gradient_checkpointing='yes'"):
        FastVisionModel.from_pretrained(str(vision_folder("gemma3")), use_gradient_checkpointing="yes")
