"""Export of vision-language models: LoRA folders and merged 16-bit folders through velotune's
exporter (export/merged.py), checked here by loading the folder in transformers' own
image-text-to-text class and comparing its logits on an image+text probe with the trained model's.

GGUF, as llama.cpp runs a vision-language model: the language model through the text exporter
(export/gguf_writer.py, on `models.vision_text.text_causal_lm`, which shares the model's text model and
head) plus the `mmproj` file of the vision tower and projector (export/gguf_mmproj.py), both checked
against the model. Families llama.cpp cannot run from our files are refused with the supported list:
Llava (the vendored llama.cpp's llava graph puts CLS last, transformers first) and Mllama (no mllama
projector in that llama.cpp: its cross-attention layers have no llama.cpp text architecture either)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..device import model_device
from ..export import ExportMismatchError, save_pretrained_merged as save_merged_folder
from ..export.folders import ExportRecord, human_size
from ..export.gguf_mmproj import PROJECTORS, check_mmproj, open_writer, write_mmproj
from ..models.spec import projector_of
from ..export.gguf_writer import model_name_of, save_pretrained_gguf as save_text_gguf
from ..export.hub import _local_folder, upload_folder
from ..export.verify import MERGED_BUDGET, compare
from ..export.weights import base_model_of, model_dtype
from ..models.vision_text import text_causal_lm

logger = logging.getLogger("velotune")

VISION_SAVE_METHODS = ("merged_16bit", "lora")
# qwen2_vl, qwen2_5_vl (qwen2vl text + merger mmproj), gemma3 (gemma3 + gemma3), llava with a Pixtral tower (llama +
# pixtral)
GGUF_FAMILIES = tuple(f"{name} (with a {spec.vision_type} vision tower)" if spec.vision_type else name
                      for name, spec in PROJECTORS.items())


def refuse_gguf(model, what: str = "GGUF export") -> None:
    config = base_model_of(model).config
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    tower = f" (vision tower {vision!r})" if vision else ""
    raise NotImplementedError(
        f"{what} of vision model type {config.model_type!r}{tower} is not supported by velotune. GGUF (the language "
        f"model plus an mmproj projector file for llama.cpp) is supported for {', '.join(GGUF_FAMILIES)}. For this "
        "model: "
        "save_pretrained (LoRA adapter) or save_pretrained_merged(..., save_method='merged_16bit') (a transformers "
        "folder, which llama.cpp's convert_hf_to_gguf.py, with --mmproj for the projector, converts where "
        "llama.cpp supports the family).")


def _processor_parts(model, processor):
    """(text tokenizer, image processor) of the processor FastVisionModel.from_pretrained returned."""
    image_processor = getattr(processor, "image_processor", None)
    if processor is None or image_processor is None:
        raise ValueError("save_pretrained_gguf of a vision model needs the processor FastVisionModel.from_pretrained "
                         "returned (its tokenizer goes into the language model's GGUF, its image mean/std into the "
                         "mmproj file); pass it as the tokenizer argument")
    return getattr(processor, "tokenizer", processor), image_processor


def save_pretrained_gguf(model, save_directory, tokenizer=None, quantization_method="fast_quantized",
                         overwrite: bool = False, verify: bool = True, mmproj_type: str = "f16",
                         **kwargs) -> list[Path]:
    """`model-<METHOD>.gguf` per method (the language model, with a Modelfile, as for text models) and
    `mmproj-<TYPE>.gguf` (vision tower + projector, f16 by default as llama.cpp's converter writes it).
    Returns the language-model paths followed by the mmproj path."""
    base = base_model_of(model)
    if projector_of(base.config) is None:
        refuse_gguf(model)
    text_tokenizer, image_processor = _processor_parts(model, tokenizer)
    folder = Path(save_directory)
    name = model_name_of(base.config, folder)
    open_writer(model, image_processor, mmproj_type, name, text_tokenizer)[0].close()  # refuse before any file
    paths = save_text_gguf(text_causal_lm(base), folder, text_tokenizer, quantization_method=quantization_method,
                           overwrite=overwrite, verify=verify, **kwargs)
    mmproj = folder / f"mmproj-{mmproj_type.upper()}.gguf"
    record = ExportRecord(folder, "gguf")
    record.begin([mmproj.name])
    try:
        digests = write_mmproj(model, mmproj, image_processor, mmproj_type, name, text_tokenizer)
    except BaseException:
        record.abort()
        raise
    details = {k: v for k, v in record.previous["groups"].get("gguf", {}).items() if k not in ("kind", "files")}
    record.finish([mmproj.name], **{**details, "mmproj": mmproj.name})
    logger.info("velotune: wrote %s (%s)", mmproj, human_size(mmproj.stat().st_size))
    if verify:
        check_vision_gguf(model, paths[0], mmproj, tokenizer, mmproj_type, digests)
    return [*paths, mmproj]


def check_vision_gguf(model, text_path: Path, mmproj: Path, processor, mmproj_type: str = "f16",
                      digests: dict | None = None) -> None:
    """The mmproj file's keys and every tensor against the model (the language model's file was checked by the
    text exporter); then, where llama-cpp-python has its multimodal library, llama.cpp's image embeddings
    against the model's on a probe image."""
    from ..export.gguf_check import GGUFContentError
    from ..export.gguf_layout import GGUFFileError
    from ..export.mtmd_check import mtmd_available, check_image_embeddings

    text_tokenizer, image_processor = _processor_parts(model, processor)
    try:
        n = check_mmproj(model, mmproj, image_processor, mmproj_type,
                         model_name_of(base_model_of(model).config, mmproj.parent), digests, text_tokenizer)
    except (GGUFContentError, GGUFFileError) as error:
        raise ExportMismatchError(f"{error}. The file was kept for inspection.") from error
    logger.info("velotune: export check %s: %d tensors and the metadata match the model", mmproj.name, n)
    if mtmd_available():
        check_image_embeddings(model, text_path, mmproj, image_processor, text_tokenizer)
    else:
        logger.info("velotune: %s was not run in llama.cpp: llama-cpp-python was built without its multimodal "
                    "library (mtmd)", mmproj.name)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="fast_quantized", token=None,
                     private=None, save_directory=None, **kwargs) -> str:
    folder = _local_folder(repo_id, save_directory)
    save_pretrained_gguf(model, folder, tokenizer, quantization_method=quantization_method, **kwargs)
    return upload_folder(folder, repo_id, token, private)


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
    device = model_device(base)
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
