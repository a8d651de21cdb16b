"""velotune's own decoder implementations, named and laid out as transformers' (see ../DESIGN)."""

from .decoder import DecoderForCausalLM
from .families import MODEL_CLASSES, SUPPORTED_MODEL_TYPES, model_class_for

__all__ = ["DecoderForCausalLM", "MODEL_CLASSES", "SUPPORTED_MODEL_TYPES", "model_class_for"]
