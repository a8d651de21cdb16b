"""Reinforcement learning: velotune's GRPO trainer with TRL's GRPOConfig fields (issue 17).

`PatchFastRL("GRPO", FastLanguageModel)` is accepted as the docs write it and does nothing: velotune
patches no library, and its GRPOTrainer is its own class.
"""

from .config import GRPOConfig
from .patch import PatchFastRL
from .reward_calls import RewardFunctionError
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "PatchFastRL", "RewardFunctionError"]
