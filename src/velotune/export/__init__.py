"""Export: merged transformers folders, GGUF files (llama.cpp), Ollama Modelfiles, hub uploads.

Each function takes the model first, so it serves LoRA models (`VelotunePeftModel` exposes them
as methods) and fully fine-tuned plain models alike:

    save_pretrained_merged(model, "out", tokenizer, save_method="merged_16bit")
    save_pretrained_gguf(model, "out", tokenizer, quantization_method=["q8_0", "q4_k_m"])
"""

from __future__ import annotations

import os
from pathlib import Path

from .gguf_writer import save_pretrained_gguf
from .hub import HubUploadError, push_to_hub_gguf, push_to_hub_merged
from .merged import SAVE_METHODS, save_pretrained_merged
from .ollama import ollama_template
from .quants import ALLOWED_QUANTS
from .verify import ExportMismatchError, check_gguf, check_merged


def save_pretrained_ollama(model, save_directory: str | os.PathLike, tokenizer=None,
                           quantization_method: str = "q4_k_m", **kwargs) -> Path:
    """A GGUF file and its Modelfile (`ollama create NAME -f <dir>/Modelfile`); fails, before
    writing anything, when no Ollama template can be generated for the tokenizer."""
    if tokenizer is None:
        raise ValueError("save_pretrained_ollama needs the tokenizer (its chat template becomes the TEMPLATE)")
    ollama_template(tokenizer)  # raise early: an Ollama export without a template would misbehave
    if not isinstance(quantization_method, str):
        raise ValueError("save_pretrained_ollama writes one model: pass a single quantization_method")
    save_pretrained_gguf(model, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)
    return Path(save_directory) / "Modelfile"


__all__ = [
    "ALLOWED_QUANTS", "ExportMismatchError", "HubUploadError", "SAVE_METHODS", "check_gguf", "check_merged",
    "ollama_template", "push_to_hub_gguf", "push_to_hub_merged", "save_pretrained_gguf", "save_pretrained_merged",
    "save_pretrained_ollama",
]
