"""`FastVisionModel`: the Unsloth API's vision entry points (from_pretrained, get_peft_model,
for_inference, for_training)."""

from __future__ import annotations

from ..inference import release
from . import loading, peft


def _base(model):
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _set_cache(model, on: bool) -> None:
    """use_cache on the model's config and on its text decoder's (composite configs keep it there)."""
    config = _base(model).config
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        cfg.use_cache = on


class FastVisionModel:
    """Namespace of the Unsloth API's vision model functions; never instantiated."""

    from_pretrained = staticmethod(loading.from_pretrained)
    get_peft_model = staticmethod(peft.get_peft_model)

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on; `generate` runs on velotune's engine where the language model is
        our decoder (Qwen2-VL, Qwen2.5-VL: from_pretrained attached the engine), else transformers' loop.
        Returns the model."""
        model.eval()
        _set_cache(model, True)
        engine = getattr(_base(model), "generation_engine", None)
        if engine is not None:
            engine.serves_generate = True
        return model

    @staticmethod
    def for_training(model):
        """Training mode with the KV cache off (and the engine's cache released); returns the model."""
        model.train()
        _set_cache(model, False)
        engine = getattr(_base(model), "generation_engine", None)
        if engine is not None:
            engine.serves_generate = False
            release(model)
        return model
