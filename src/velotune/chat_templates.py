"""`velotune.chat_templates`: the names the docs import from `unsloth.chat_templates`.

    from velotune.chat_templates import get_chat_template, standardize_sharegpt, to_sharegpt
    from velotune.chat_templates import apply_chat_template, train_on_responses_only

The implementations live in `velotune.data`; this module only re-exports them.
"""

from .data.chat import get_chat_template, ollama_template_for
from .data.formatting import apply_chat_template
from .data.masking import DataCollatorForResponseOnly
from .data.registry import CHAT_TEMPLATES, get_template_record
from .data.responses import train_on_responses_only
from .data.sharegpt import standardize_sharegpt, to_sharegpt

__all__ = [
    "CHAT_TEMPLATES", "DataCollatorForResponseOnly", "apply_chat_template", "get_chat_template",
    "get_template_record", "ollama_template_for", "standardize_sharegpt", "to_sharegpt", "train_on_responses_only",
]
