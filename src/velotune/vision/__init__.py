"""Vision-language fine-tuning (issue 20): `FastVisionModel` and the vision data collator.

    model, processor = FastVisionModel.from_pretrained(name, load_in_4bit=True)
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, ...)
    SFTTrainer(model, tokenizer=processor, data_collator=UnslothVisionDataCollator(model, processor), ...)
"""

from __future__ import annotations

from .collator import VisionDataCollator
from .model import FastVisionModel
from .peft import VisionPeftModel

UnslothVisionDataCollator = VisionDataCollator  # the docs' name

__all__ = ["FastVisionModel", "UnslothVisionDataCollator", "VisionDataCollator", "VisionPeftModel"]
