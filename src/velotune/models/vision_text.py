"""The language model of a vision-language model as a causal LM of its own, for exporting it apart from the
vision tower (llama.cpp runs a vision-language model as a text GGUF plus an `mmproj` projector file).

`text_causal_lm(model)` builds one of our `DecoderForCausalLM` classes on the meta device and puts the
vision-language model's own decoder and lm_head into it: every tensor is shared, LoRA layers included, so the
text exporters (plan_tensors / materialize, the GGUF writer and its checks) see the trained weights merged, under
the names a text checkpoint of the family has (`model.layers.N...`, `lm_head`), without a copy. Its config is the
text config, whose model_type (e.g. `qwen2_vl_text`) picks the GGUF record (spec.TEXT_PARTS).

Vision-language models whose language model is transformers' own (Gemma 3: its text model is transformers'
Gemma3TextModel, see models/vision_lm.py) get transformers' causal-LM class of the text config instead, built
the same way (meta, then the model's text model and lm_head put in), when the text family is one the GGUF writer
knows (`family_of(text config).gguf`): its module names are the text checkpoint's, so the exporters see
`model.layers.N...` and `lm_head` there too.
"""

from __future__ import annotations

import copy

import torch
import transformers

from .decoder import DecoderForCausalLM, DecoderModel
from .families import model_class_for
from .spec import TEXT_PARTS, family_of


class Qwen2VLTextForCausalLM(DecoderForCausalLM):
    """Qwen2-VL's language model alone: Qwen2's decoder with M-RoPE tables (text-only ids are equal on all
    three axes, so it is Qwen2 with ordinary RoPE on text)."""

    config_class = transformers.Qwen2VLTextConfig
    spec = TEXT_PARTS["qwen2_vl_text"]


class Qwen2_5_VLTextForCausalLM(DecoderForCausalLM):
    """Qwen2.5-VL's language model alone (the same decoder as Qwen2-VL's)."""

    config_class = transformers.Qwen2_5_VLTextConfig
    spec = TEXT_PARTS["qwen2_5_vl_text"]


_TEXT_CLASSES = {cls.spec.model_type: cls for cls in (Qwen2VLTextForCausalLM, Qwen2_5_VLTextForCausalLM)}


def _transformers_causal_lm(text_config):
    """transformers' causal-LM class for a text config whose family the GGUF writer knows, else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    spec = family_of(text_config)
    if spec is None or spec.gguf is None:
        return None
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except KeyError:
        return None


def text_causal_lm(model) -> torch.nn.Module:
    """A causal LM over `model`'s language model and lm_head (shared, not copied). `model` is the transformers-
    level vision-language model (under any PEFT wrapper: pass `get_base_model()`): on velotune's decoder, or on
    transformers' text model where the text family has a GGUF record (module docstring)."""
    decoder = model.model.language_model
    text = copy.deepcopy(model.config.get_text_config())
    # whether the head is the embedding matrix is the whole model's setting (transformers reads it there)
    text.tie_word_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))
    if isinstance(decoder, DecoderModel):
        cls = _TEXT_CLASSES.get(text.model_type) or model_class_for(text)
    else:
        cls = _transformers_causal_lm(text)
        if cls is None:
            raise NotImplementedError(
                f"{type(model).__name__}: its language model is transformers' {type(decoder).__name__}, not "
                "velotune's decoder, and not a family velotune writes as GGUF, so it cannot be exported on its own; "
                "save it with save_pretrained_merged and convert the folder with llama.cpp's convert_hf_to_gguf.py "
                "(and --mmproj for the projector)")
    with torch.device("meta"):
        lm = cls(text)
    lm.model = decoder
    lm.lm_head = model.lm_head
    lm.train(model.training)
    return lm
