"""Export of vision-language models: LoRA folders and merged 16-bit folders through velotune's
exporter (export/merged.py), checked here by loading the folder in transformers' own
image-text-to-text class and comparing its logits on an image+text probe with the trained model's.
GGUF is refused for now, naming what is supported."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..export import ExportMismatchError, save_pretrained_merged as save_merged_folder
from ..export.verify import MERGED_BUDGET, compare
from ..export.weights import base_model_of, model_dtype

logger = logging.getLogger("velotune")

VISION_SAVE_METHODS = ("merged_16bit", "lora")


def refuse_gguf(model) -> None:
    model_type = base_model_of(model).config.model_type
    raise NotImplementedError(
        f"GGUF export of vision models ({model_type!r}: the language model plus an mmproj projector file) is not "
        "supported by velotune yet. Supported for vision models: save_pretrained (LoRA adapter), "
        "save_pretrained_merged(..., save_method='merged_16bit') (a transformers folder, which llama.cpp's "
        "convert_hf_to_gguf.py --mmproj can convert), and save_method='lora'. GGUF export is supported for the text "
        "models FastLanguageModel loads.")


def save_pretrained_merged(model, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                           verify: bool = True, **kwargs) -> Path:
    """merged_16bit or lora; the merged folder is checked with an image (see module docstring)."""
    method = str(save_method).strip().lower()
    if method not in VISION_SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}: vision models save as {', '.join(VISION_SAVE_METHODS)} "
                         "(4-bit merged vision folders are not supported yet)")
    folder = save_merged_folder(model, save_directory, tokenizer, save_method=method, verify=False, **kwargs)
    if verify and method == "merged_16bit":
        check_merged_vision(model, folder, tokenizer)
    return folder


def probe_inputs(processor, device) -> dict:
    """One image (a colour gradient) and a short question, as the processor prepares them."""
    from PIL import Image

    ramp = torch.linspace(0, 255, 48).to(torch.uint8)  # (48,)
    pixels = torch.stack([ramp.expand(48, 48), ramp.expand(48, 48).T, torch.full((48, 48), 128, dtype=torch.uint8)],
                         -1)  # (48, 48, 3)
    image = Image.fromarray(pixels.numpy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def check_merged_vision(model, folder: Path, processor) -> float | None:
    """Mean KL between the trained model and the folder loaded by transformers; raises above the dtype's budget."""
    from transformers import AutoModelForImageTextToText

    if processor is None or not hasattr(processor, "image_processor"):
        logger.info("velotune: export check of %s skipped: pass the processor to check it with an image", folder)
        return None
    base = base_model_of(model)
    device = next(base.parameters()).device
    dtype = model_dtype(model)
    inputs = probe_inputs(processor, device)
    was_training = model.training
    model.eval()
    try:
        reference = model(**inputs, use_cache=False).logits[0].float().cpu()  # (T, V)
    finally:
        model.train(was_training)
    loaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()
    exported = loaded(**inputs, use_cache=False).logits[0].float().cpu()  # (T, V)
    del loaded
    result = compare([reference], [exported])
    budget = MERGED_BUDGET.get(dtype, 2e-2)
    logger.info("velotune: export check (transformers, with an image) %s: %s; budget %.0e", folder,
                result.describe(), budget)
    if not result.mean_kl <= budget:
        raise ExportMismatchError(f"{folder} (loaded by transformers) does not behave like the trained model on an "
                                  f"image: {result.describe()}, above the {budget:.0e} this format's rounding "
                                  "explains. The folder was kept for inspection; please report this.")
    return result.mean_kl
