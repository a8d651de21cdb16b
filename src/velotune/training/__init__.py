"""Training: TRL's SFT trainer with the Unsloth API's arguments, checks, reports and safe checkpoints."""

from .arguments import TrainingArguments, UnslothTrainingArguments
from .callbacks import LossPlotCallback, ProgressFieldsCallback, SummaryCallback
from .memory import MemoryEstimate, estimate
from .trainer import NonFiniteLossError, SFTTrainer, Trainer, UnslothTrainer

__all__ = ["LossPlotCallback", "MemoryEstimate", "NonFiniteLossError", "ProgressFieldsCallback", "SFTTrainer",
           "SummaryCallback", "Trainer", "TrainingArguments", "UnslothTrainer", "UnslothTrainingArguments",
           "estimate"]
