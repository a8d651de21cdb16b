"""`FastVisionModel`: the Unsloth API's vision entry points (from_pretrained, get_peft_model,
for_inference, for_training)."""

from __future__ import annotations

from . import loading, peft


def _base(model):
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


class FastVisionModel:
    """Namespace of the Unsloth API's vision model functions; never instantiated."""

    from_pretrained = staticmethod(loading.from_pretrained)
    get_peft_model = staticmethod(peft.get_peft_model)

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on; generation runs transformers' loop (the fast engine serves
        text-only decoders). Returns the model."""
        model.eval()
        _base(model).config.use_cache = True
        return model

    @staticmethod
    def for_training(model):
        """Training mode with the KV cache off; returns the model."""
        model.train()
        _base(model).config.use_cache = False
        return model
