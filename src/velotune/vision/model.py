"""`FastVisionModel`: the Unsloth API's vision entry points (from_pretrained, get_peft_model,
for_inference, for_training)."""

from __future__ import annotations

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
        """Evaluation mode with the KV cache on; generation runs transformers' loop (the fast engine serves
        text-only decoders). Returns the model."""
        model.eval()
        _set_cache(model, True)
        return model

    @staticmethod
    def for_training(model):
        """Training mode with the KV cache off; returns the model."""
        model.train()
        _set_cache(model, False)
        return model
