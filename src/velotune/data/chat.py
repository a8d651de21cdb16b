"""`get_chat_template`: put a chat format on a tokenizer, as the docs' "Chat Templates" page shows.

`map_eos_token=True` makes the format's end-of-turn token and the tokenizer's EOS the same token,
without adding tokens or resizing embeddings:
  * the end token already exists in the vocabulary -> it becomes `tokenizer.eos_token`, so
    generation stops at the end of a turn;
  * it does not exist (e.g. "<|im_end|>" on a Llama 2 tokenizer) -> the template writes the
    tokenizer's EOS string in its place ("Maps <|im_end|> to </s> instead", in the docs' words).
    Otherwise "<|im_end|>" would be split into ordinary pieces that no model learns to stop on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

from .registry import get_template_record
from .templates import _jinja_mapping_prelude, read_name_tag

SHAREGPT_MAPPING = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}


def _in_vocab(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def _system_prelude(system_message: str | None) -> str:
    """For templates we did not write: insert `system_message` when a conversation has none."""
    if system_message is None:
        return ""
    msg = json.dumps({"role": "system", "content": system_message}, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{msg}] + messages %}}{{%- endif %}}")


def _map_end_token(tokenizer, template: str, end_token: str, map_eos_token: bool, what: str) -> str:
    """Apply the `map_eos_token` rule for one literal end token; returns the (maybe) edited template."""
    if end_token == tokenizer.eos_token:
        return template
    if _in_vocab(tokenizer, end_token):
        if map_eos_token:
            tokenizer.eos_token = end_token
        return template
    if map_eos_token:
        if tokenizer.eos_token is None:
            raise ValueError(f"{what}: the tokenizer has no EOS token to map {end_token!r} onto")
        return template.replace(end_token, tokenizer.eos_token)
    warnings.warn(
        f"{what} ends turns with {end_token!r}, which is not a token of this tokenizer: it will be split "
        "into ordinary pieces and generation will not stop on it. Pass map_eos_token=True, or add the "
        "token and resize the model's embeddings.",
        stacklevel=3,
    )
    return template


def get_chat_template(tokenizer, chat_template=None, mapping: dict | None = None, map_eos_token: bool = True,
                      system_message: str | None = None):
    """Set `tokenizer.chat_template` (in place) and return the tokenizer.

    chat_template: a registry name ("chatml", "llama-3", ...), a `(template, eos_token)` tuple
        whose template must use `eos_token` (the string "eos_token" means the tokenizer's own EOS),
        or None: keep the tokenizer's own template when it has one, else "chatml".
    mapping: message keys and role names of the dataset, e.g. ShareGPT's
        {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}.
    system_message: replaces the format's default system prompt (used when a conversation has none).
    """
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            own = tokenizer.chat_template
            if not isinstance(own, str):
                raise ValueError("this tokenizer holds several named templates; pass chat_template explicitly")
            tokenizer.chat_template = _jinja_mapping_prelude(mapping) + _system_prelude(system_message) + own
            return tokenizer
        chat_template = "chatml"

    if isinstance(chat_template, str):
        record = get_template_record(chat_template).with_system(system_message)
        template = record.jinja(mapping)
        if record.stop_token is not None:
            template = _map_end_token(tokenizer, template, record.stop_token, map_eos_token,
                                      f"chat template {record.name!r}")
        if "eos_token" in template and tokenizer.eos_token is None:
            raise ValueError(f"chat template {record.name!r} ends turns with EOS, but the tokenizer has none")
        tokenizer.chat_template = template
        _set_ollama_modelfile(tokenizer)
        return tokenizer

    if not (isinstance(chat_template, (tuple, list)) and len(chat_template) == 2
            and all(isinstance(x, str) for x in chat_template)):
        raise TypeError("chat_template must be a registry name or a (template, eos_token) tuple of two strings, "
                        f"got {type(chat_template).__name__}")
    template, eos = chat_template
    if eos == "eos_token":
        if "eos_token" not in template:
            raise ValueError("custom chat template: eos_token='eos_token' was given, but the template never uses "
                             "the `eos_token` variable, so turns would not end with EOS")
    else:
        if eos not in template:
            raise ValueError(f"custom chat template: the EOS token {eos!r} must appear inside the template")
        template = _map_end_token(tokenizer, template, eos, map_eos_token, "custom chat template")
    tokenizer.chat_template = _jinja_mapping_prelude(mapping) + _system_prelude(system_message) + template
    tokenizer.__dict__.pop("_ollama_modelfile", None)  # a custom template has no Ollama form (no record)
    return tokenizer


@dataclass(frozen=True)
class OllamaTemplate:
    """What a `Modelfile` needs from the chat format: TEMPLATE, the `stop` parameters, SYSTEM."""

    template: str
    stop_tokens: tuple[str, ...]
    system: str | None


# Where the GGUF goes in a Modelfile made before any file exists (Unsloth's placeholder, kept so
# the text the docs print looks the same).
FILE_LOCATION = "{__FILE_LOCATION__}"


def _quoted_block(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f"the {what} contains '\"\"\"', which a Modelfile cannot quote")
    return f'"""{text}"""'


def modelfile_text(location: str, info: OllamaTemplate | None, extra_stops=(), note: str | None = None) -> str:
    """An Ollama Modelfile: FROM `location`, TEMPLATE, a `PARAMETER stop` per end token, SYSTEM
    (info None: FROM and `extra_stops` only, with `note` as a comment saying why)."""
    lines = [f"FROM {location}"]
    if info is not None:
        lines.append(f"TEMPLATE {_quoted_block(info.template, 'chat template')}")
    stops = dict.fromkeys([*(info.stop_tokens if info else ()), *extra_stops])
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops if s]
    if info is not None and info.system:
        lines.append(f"SYSTEM {_quoted_block(info.system, 'system prompt')}")
    if note:
        lines.insert(0, f"# {note}")
    return "\n".join(lines) + "\n"


def _set_ollama_modelfile(tokenizer) -> None:
    """`tokenizer._ollama_modelfile`, which the docs print (Unsloth sets it in get_chat_template):
    the Modelfile for this format, FROM a placeholder until a GGUF export writes the real one."""
    try:
        tokenizer._ollama_modelfile = modelfile_text(FILE_LOCATION, ollama_template_for(tokenizer))
    except ValueError:  # a format Ollama cannot express: the GGUF export says why and writes FROM/stop only
        tokenizer.__dict__.pop("_ollama_modelfile", None)


def ollama_template_for(tokenizer) -> OllamaTemplate:
    """The Ollama side of the template `get_chat_template` put on `tokenizer` (also after the
    tokenizer was saved and reloaded: the registry name lives in a Jinja comment)."""
    tag = read_name_tag(getattr(tokenizer, "chat_template", None))
    if tag is None:
        raise ValueError("the tokenizer's chat template was not set by velotune.get_chat_template; "
                         "call get_chat_template(tokenizer, chat_template=NAME) first")
    name, system = tag
    record = get_template_record(name).with_system(system)
    eos = tokenizer.eos_token
    go = record.ollama_template(eos)
    stops = record.stop_tokens(eos)
    if record.stop_token is not None and not _in_vocab(tokenizer, record.stop_token):
        go = go.replace(record.stop_token, eos)  # the same mapping get_chat_template applied
        stops = tuple(dict.fromkeys(eos if s == record.stop_token else s for s in stops))
    return OllamaTemplate(template=go, stop_tokens=stops, system=record.default_system)
