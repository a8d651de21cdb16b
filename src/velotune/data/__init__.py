"""Data: chat template registry, ShareGPT helpers, response-only masking, local files, bundled sets."""

from .bundled import bundled_path, load_bundled
from .chat import OllamaTemplate, get_chat_template, ollama_template_for
from .formatting import apply_chat_template, parse_text_template
from .loading import DataFormatError, detect_format, load_local_dataset, validate_dataset
from .masking import DataCollatorForResponseOnly, ResponseMarkerError, ResponseMasker
from .registry import CHAT_TEMPLATES, get_template_record
from .responses import infer_markers, train_on_responses_only
from .sharegpt import standardize_sharegpt, to_sharegpt
from .synthetic import arithmetic_word_problems
from .templates import ChatTemplate, TurnFormat

__all__ = [
    "CHAT_TEMPLATES", "ChatTemplate", "DataCollatorForResponseOnly", "DataFormatError", "OllamaTemplate",
    "ResponseMarkerError", "ResponseMasker", "TurnFormat", "apply_chat_template", "arithmetic_word_problems",
    "bundled_path", "detect_format", "get_chat_template", "get_template_record", "infer_markers",
    "load_bundled", "load_local_dataset", "ollama_template_for", "parse_text_template", "standardize_sharegpt",
    "to_sharegpt", "train_on_responses_only", "validate_dataset",
]
