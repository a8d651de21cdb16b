"""Text of a completion, whichever form TRL's reward signature hands it over in, and number parsing."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """A plain completion is its string; a conversational one is a list of messages, whose assistant
    contents are joined (TRL gives one assistant message; tool-calling turns can add more)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content(completion.get("content", ""))
    if isinstance(completion, Sequence):
        parts = [_content(m.get("content", "")) for m in completion
                 if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"]
        return "".join(parts)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _content(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


def completion_texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


def normalize_number(text) -> str | None:
    """'1,234.50' -> '1234.5', '$72' -> '72', '9.0' -> '9': the canonical form of the last number in
    `text`, so '72' and '72.00' compare equal; None when there is no number."""
    if text is None:
        return None
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    raw = found[-1].replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if value.is_integer():
        return str(int(value))
    return repr(value)


def numbers_in(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text) if n.replace(",", "").strip("-.")]
