"""Ollama `Modelfile`s: FROM the GGUF, TEMPLATE as an Ollama Go template, a `PARAMETER stop` per
end token, SYSTEM when the format has a system prompt.

The Go template comes from the same registry record as the tokenizer's Jinja template
(`velotune.data.templates.ChatTemplate`), so the two agree by construction. A tokenizer whose
template was not set by `get_chat_template` (e.g. SmolLM2's own) is matched against every
registry format by rendering probe conversations both ways; when none renders identically,
no TEMPLATE can be generated and the error says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from velotune.data.chat import OllamaTemplate, ollama_template_for
from velotune.data.chat import modelfile_text as _modelfile_text
from velotune.data.registry import CHAT_TEMPLATES
from velotune.data.templates import ChatTemplate

logger = logging.getLogger("velotune")

_PROBES = (
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}],
)


def _render_own(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may reject a probe (e.g. no system role): not a match
        return None


def _render_record(record: ChatTemplate, tokenizer, messages) -> str | None:
    try:
        return record.render(messages, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        return None


def _default_system(record: ChatTemplate, tokenizer, text: str) -> str | None:
    """The system prompt a template inserts on its own, read from its rendering of a conversation
    without one (SmolLM2's "You are a helpful AI assistant named SmolLM ...")."""
    if record.turns.system is None:
        return None
    fill = {"{bos}": tokenizer.bos_token or "", "{eos}": tokenizer.eos_token or ""}

    def sub(s: str) -> str:
        for k, v in fill.items():
            s = s.replace(k, v)
        return s

    head, tail = sub(record.turns.begin) + sub(record.turns.system[0]), sub(record.turns.system[1])
    if not text.startswith(head) or tail not in text[len(head):]:
        return None
    return text[len(head): text.index(tail, len(head))]


def matching_record(tokenizer) -> ChatTemplate | None:
    """The registry format (with its default system prompt) the tokenizer's template renders like."""
    own = [_render_own(tokenizer, m) for m in _PROBES]
    if any(o is None for o in own):
        return None
    for record in CHAT_TEMPLATES.values():
        candidates = [record]
        system = _default_system(record, tokenizer, own[0])
        if system:
            candidates.append(record.with_system(system))
        for candidate in candidates:
            if all(_render_record(candidate, tokenizer, m) == o for m, o in zip(_PROBES, own)):
                return candidate
    return None


def ollama_template(tokenizer) -> OllamaTemplate:
    """TEMPLATE/stop/SYSTEM for `tokenizer`; ValueError when no Ollama template can be generated."""
    try:
        return ollama_template_for(tokenizer)
    except ValueError:
        pass
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("no Ollama template can be generated: the tokenizer has no chat template. Call "
                         "velotune.chat_templates.get_chat_template(tokenizer, chat_template=NAME) first.")
    record = matching_record(tokenizer)
    if record is None:
        raise ValueError(
            "no Ollama template can be generated: the tokenizer's chat template renders like none of velotune's "
            f"registry formats ({', '.join(CHAT_TEMPLATES)}). Set one with get_chat_template(tokenizer, "
            "chat_template=NAME) before training, or write the Modelfile's TEMPLATE yourself.")
    eos = tokenizer.eos_token
    return OllamaTemplate(template=record.ollama_template(eos), stop_tokens=record.stop_tokens(eos),
                          system=record.default_system)


def modelfile_text(gguf_name: str, info: OllamaTemplate | None, extra_stops=(), note: str | None = None) -> str:
    """The Modelfile for a GGUF file next to it (see `velotune.data.chat.modelfile_text`)."""
    return _modelfile_text(f"./{gguf_name}", info, extra_stops, note)


def write_modelfile(path: Path, gguf_file: Path, tokenizer, strict: bool) -> Path:
    """Write a Modelfile for `gguf_file`. strict=False: without a generatable template, write FROM and
    the EOS stop only, and say why (Ollama then falls back to the template inside the GGUF)."""
    try:
        info, note = ollama_template(tokenizer), None
    except ValueError as error:
        if strict:
            raise
        info, note = None, str(error)
        logger.warning("velotune: %s", error)
    eos = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    text = modelfile_text(gguf_file.name, info, extra_stops=() if info else eos, note=note)
    path.write_text(text)
    if path.name == "Modelfile":  # the first method's (gguf_writer); the docs print it after the export
        tokenizer._ollama_modelfile = text
    return path
