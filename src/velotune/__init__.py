"""velotune: fast, memory-lean fine-tuning of large language models."""

from .device import is_bfloat16_supported
from .loading import FastLanguageModel
from .lora import VelotunePeftModel
from .training import (SFTTrainer, Trainer, TrainingArguments, UnslothTrainer,  # noqa: F401
                       UnslothTrainingArguments)

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "VelotunePeftModel", "is_bfloat16_supported"]
__all__ += ["SFTTrainer", "Trainer", "TrainingArguments", "UnslothTrainer", "UnslothTrainingArguments"]
