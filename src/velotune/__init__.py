"""velotune: fast, memory-lean fine-tuning of large language models."""

from .device import is_bfloat16_supported
from .loading import FastLanguageModel
from .lora import VelotunePeftModel

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "VelotunePeftModel", "is_bfloat16_supported"]
