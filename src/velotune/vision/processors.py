"""Loading a model's processor (image processor + tokenizer + chat template).

transformers 5 makes torchvision optional, but Qwen2-VL's and Qwen2.5-VL's processors also
hold a video processor, which cannot be built without it, so `AutoProcessor` fails on a machine
without torchvision even for image-only work. There the processor is built with its image
processor and tokenizer only (`image_only_processor`): images work exactly as with the full one,
videos are refused by the processor itself. A warning says so once. A folder saved that way also
loads image-only on a machine with torchvision (transformers 5.17 finds no video processor settings in it).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

logger = logging.getLogger("velotune")


def load_processor(folder, trust_remote_code: bool = False):
    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as error:
        from transformers.utils import is_torchvision_available

        processor_cls = _processor_class(folder)
        if processor_cls is None or "video_processor" not in processor_cls.get_attributes():
            raise
        if not is_torchvision_available():
            why = "torchvision is not installed, so its video processor cannot be built"
        elif _saved_without_video_processor(folder):
            why = "the folder was saved without a video processor (on a machine without torchvision)"
        else:
            raise
        logger.warning("velotune: %s: %s (%s); loading its image processor and tokenizer only: images work, videos "
                       "do not", processor_cls.__name__, why, type(error).__name__)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        image_processor = _image_processor(folder, trust_remote_code)
        return image_only_processor(processor_cls)(image_processor=image_processor, tokenizer=tokenizer,
                                                   chat_template=tokenizer.chat_template)


def _image_processor(folder, trust_remote_code: bool):
    """The folder's image processor; where AutoImageProcessor itself needs torchvision (transformers 5.17), the
    PIL class of the same name (`<Name>Pil`, which transformers 5 exports for every torchvision-backed one)."""
    try:
        return AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ImportError:
        import transformers

        settings = _saved_settings(folder).get("image_processor") or _saved_settings(folder, "preprocessor_config.json")
        name = settings.get("image_processor_type", "")
        pil = getattr(transformers, name.removesuffix("Pil") + "Pil", None) if name else None
        if pil is None:
            raise
        return pil.from_pretrained(folder)


def _saved_settings(folder, name: str = "processor_config.json") -> dict:
    """A settings file of a local folder ({} when there is none): processor_config.json (transformers 5 saves
    every part in it), preprocessor_config.json (the image processor alone, as most checkpoints have it)."""
    config = Path(folder) / name
    return json.loads(config.read_text()) if config.is_file() else {}


def _saved_without_video_processor(folder) -> bool:
    """Whether a local folder holds no video processor settings (neither its own file nor an entry in
    processor_config.json): what `image_only_processor` saves."""
    path = Path(folder)
    if not path.is_dir() or (path / "video_preprocessor_config.json").exists():
        return False
    return "video_processor" not in _saved_settings(folder)


def _processor_class(folder):
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    import transformers

    model_type = AutoConfig.from_pretrained(folder).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


@functools.cache
def image_only_processor(processor_cls):
    """A subclass of `processor_cls` whose parts are its image processor and tokenizer (no video processor).

    Its name is the parent's, so a saved folder names the real class and loads anywhere with torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    members = {"__init__": __init__, "__doc__": image_only_processor.__doc__, "__module__": __name__}
    return type(processor_cls.__name__, (processor_cls,), members)
