"""velotune: fast, memory-lean fine-tuning of large language models."""

from .device import is_bfloat16_supported
from .loading import FastLanguageModel
from .lora import VelotunePeftModel

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "VelotunePeftModel", "is_bfloat16_supported"]
__all__ += ["SFTTrainer", "Trainer", "TrainingArguments", "UnslothTrainer", "UnslothTrainingArguments"]

_TRAINING = ("SFTTrainer", "Trainer", "TrainingArguments", "UnslothTrainer", "UnslothTrainingArguments")


def __getattr__(name):
    """Training names load on first use: they import TRL, which inference-only installs may lack."""
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'velotune' has no attribute {name!r}")
