"""Which vision-language families run their language model on our decoder, and with which class."""

from __future__ import annotations

from .llava import TEXT_FAMILIES as LLAVA_TEXT_FAMILIES
from .llava import LlavaForConditionalGeneration
from .mllama import MllamaForConditionalGeneration
from .qwen_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

OWN_DECODER_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration,
                       "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                       "llava": LlavaForConditionalGeneration,
                       "mllama": MllamaForConditionalGeneration}


def own_decoder_class(config):
    """Our class for a vision-language config whose language model is one of our decoders, or None (the model
    then runs on transformers' classes entirely)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llava" and config.get_text_config().model_type not in LLAVA_TEXT_FAMILIES:
        return None
    return OWN_DECODER_CLASSES.get(model_type)
