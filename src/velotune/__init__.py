"""velotune: fast, memory-lean fine-tuning of large language models."""

from . import quiet

quiet.install()  # before anything imports bitsandbytes (quiet.py says why)

from .device import is_bfloat16_supported  # noqa: E402
from .fast_language_model import FastLanguageModel
from .inference import LoRARequest, SamplingParams  # vLLM's names, for the docs' GRPO notebooks
from .lora import VelotunePeftModel

__version__ = "0.1.0"

_TRAINING = ("SFTTrainer", "Trainer", "TrainingArguments", "UnslothTrainer", "UnslothTrainingArguments")
# The docs import these from the top level too (`from unsloth import to_sharegpt, ...`), as
# unsloth re-exports its chat_templates module there.
_CHAT_TEMPLATES = ("apply_chat_template", "get_chat_template", "standardize_sharegpt", "to_sharegpt",
                   "train_on_responses_only")
# Preference training through TRL's trainers, taking the docs' older keywords (rl/preference.py).
_PREFERENCE = ("CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "ORPOConfig",
               "ORPOTrainer", "PatchDPOTrainer")
# GRPO (issue 17): velotune's own trainer with TRL's GRPOConfig fields; PatchFastRL is the docs' no-op.
_RL = ("GRPOConfig", "GRPOTrainer", "PatchFastRL")
# Vision (issue 20): FastVisionModel and the docs' collator name (velotune/vision/); the vision notebooks'
# SFTConfig(max_seq_length=...) is TRL's older keyword, which velotune's SFTConfig (its TrainingArguments) takes.
_VISION = ("FastVisionModel", "UnslothVisionDataCollator", "SFTConfig")

__all__ = ["FastLanguageModel", "LoRARequest", "SamplingParams", "VelotunePeftModel", "is_bfloat16_supported",
           *_TRAINING, *_CHAT_TEMPLATES, *_PREFERENCE, *_RL, *_VISION]


def __getattr__(name):
    """Training and data names load on first use: they import TRL and datasets, which
    inference-only installs may lack."""
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    if name in _CHAT_TEMPLATES:
        from . import chat_templates

        return getattr(chat_templates, name)
    if name in _PREFERENCE:
        from .rl import preference

        return getattr(preference, name)
    if name in _RL:
        from . import rl

        return getattr(rl, name)
    if name == "SFTConfig":
        from .training import TrainingArguments

        return TrainingArguments
    if name in _VISION:
        from . import vision

        return getattr(vision, name)
    raise AttributeError(f"module 'velotune' has no attribute {name!r}")
