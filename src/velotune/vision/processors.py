"""Loading a model's processor (image processor + tokenizer + chat template).

transformers 5 makes torchvision optional, but Qwen2-VL's and Qwen2.5-VL's processors also
hold a video processor, which cannot be built without it, so `AutoProcessor` fails on a machine
without torchvision even for image-only work. There the processor is built with its image
processor and tokenizer only (`image_only_processor`): images work exactly as with the full one,
videos are refused by the processor itself. A warning says so once.
"""

from __future__ import annotations

import functools
import logging

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

logger = logging.getLogger("velotune")


def load_processor(folder, trust_remote_code: bool = False):
    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as error:
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            raise
        processor_cls = _processor_class(folder)
        if processor_cls is None or "video_processor" not in processor_cls.get_attributes():
            raise
        logger.warning("velotune: torchvision is not installed, so %s's video processor cannot be built (%s); "
                       "loading its image processor and tokenizer only: images work, videos do not "
                       "(pip install torchvision for both)", processor_cls.__name__, type(error).__name__)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return image_only_processor(processor_cls)(image_processor=image_processor, tokenizer=tokenizer,
                                                   chat_template=tokenizer.chat_template)


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
