"""LoRA adapters: PEFT bookkeeping, velotune's checks and (later) fused paths."""

from .peft_model import VelotunePeftModel, get_peft_model

__all__ = ["VelotunePeftModel", "get_peft_model"]
