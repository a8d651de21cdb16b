"""ShareGPT helpers from the docs' Llama-3/Ollama tutorial (sections 7-8):

* `to_sharegpt` merges the columns of a table (CSV/Excel-style) into one user prompt per row,
  with `{column}` substitution and `[[...]]` optional sections, and can stitch N random rows into
  one multi-turn conversation (`conversation_extension`).
* `standardize_sharegpt` turns ShareGPT `from`/`value` messages into `role`/`content` ones.
"""

from __future__ import annotations

import math
import random
import re

_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_COLUMN = re.compile(r"\{([^{}]+)\}")

DEFAULT_ALIASES = {
    "system": ("system",),
    "user": ("user", "human", "input"),
    "assistant": ("assistant", "gpt", "output", "model", "bot"),
}


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip() == "":
        return True
    try:  # pandas.NA / NaT and numpy NaN types without importing pandas
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def _as_text(value) -> str:
    """Cell value to prompt text. Whole-number floats print as integers: a CSV column with
    missing ages loads as float, and "Their age is 23." reads better than "23.0"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def merge_columns(merged_prompt: str, row: dict) -> str:
    """Fill `{column}` fields; drop each `[[...]]` section in which any column is missing."""

    def optional(match: re.Match) -> str:
        section = match.group(1)
        if any(_is_missing(row.get(col)) for col in _COLUMN.findall(section)):
            return ""
        return section

    text = _OPTIONAL.sub(optional, merged_prompt)
    return _COLUMN.sub(lambda m: "" if _is_missing(row.get(m.group(1))) else _as_text(row[m.group(1)]), text)


def to_sharegpt(dataset, merged_prompt: str = "", merged_column_name: str = "instruction",
                output_column_name: str = "output", remove_unused_columns: bool = True,
                conversation_extension: int = 1, random_state: int = 3407):
    """Return a dataset with one `conversations` column of ShareGPT messages (human/gpt).

    merged_prompt: e.g. "[[The passenger embarked from {Embarked}.]] [[Their age is {Age}.]]";
        empty means "use column `merged_column_name` as the prompt".
    conversation_extension: merge this many rows (row i plus randomly drawn others, drawn with
        `random_state`, so the result is reproducible) into one multi-turn conversation.
    """
    columns = set(dataset.column_names)
    prompt = merged_prompt or "{" + merged_column_name + "}"
    unknown = sorted(set(_COLUMN.findall(prompt)) - columns)
    if unknown:
        raise KeyError(f"to_sharegpt: merged_prompt uses column(s) {unknown} that the dataset lacks; "
                       f"columns are {sorted(columns)}")
    if output_column_name not in columns:
        raise KeyError(f"to_sharegpt: output_column_name {output_column_name!r} is not a column; "
                       f"columns are {sorted(columns)}")
    if not isinstance(conversation_extension, int) or conversation_extension < 1:
        raise ValueError(f"conversation_extension must be an integer >= 1, got {conversation_extension!r}")

    def turn(row: dict) -> list[dict]:
        answer = row[output_column_name]
        return [{"from": "human", "value": merge_columns(prompt, row)},
                {"from": "gpt", "value": "" if _is_missing(answer) else _as_text(answer)}]

    turns = [turn(row) for row in dataset]
    n = len(turns)
    rng = random.Random(random_state)
    orders = [list(range(n))]
    for _ in range(conversation_extension - 1):
        order = list(range(n))
        rng.shuffle(order)
        orders.append(order)
    conversations = [[msg for order in orders for msg in turns[order[i]]] for i in range(n)]

    from datasets import Dataset

    if remove_unused_columns:
        return Dataset.from_dict({"conversations": conversations})
    keep = dataset.remove_columns([c for c in dataset.column_names if c == "conversations"])
    return keep.add_column("conversations", conversations)


def _first(msg, *keys):
    """First non-None of `keys`: Arrow gives every message all keys seen in the column."""
    if not isinstance(msg, dict):
        return None
    return next((msg[k] for k in keys if msg.get(k) is not None), None)


def _role_names(aliases_for_system, aliases_for_user, aliases_for_assistant) -> dict[str, str]:
    names: dict[str, str] = {}
    for role, aliases in (("system", aliases_for_system), ("user", aliases_for_user),
                          ("assistant", aliases_for_assistant)):
        for alias in aliases:
            if names.setdefault(alias, role) != role:
                raise ValueError(f"role alias {alias!r} is given for both {names[alias]!r} and {role!r}")
    return names


def standardize_sharegpt(dataset, aliases_for_system=DEFAULT_ALIASES["system"],
                         aliases_for_user=DEFAULT_ALIASES["user"],
                         aliases_for_assistant=DEFAULT_ALIASES["assistant"],
                         column: str | None = None):
    """Convert a ShareGPT column (`from`/`value`, `human`/`gpt`) to `role`/`content` messages with
    roles system/user/assistant. Already-standard rows pass through, so calling it twice is safe.
    A message without a role or content key, or with an unknown role, raises with its row number."""
    if column is None:
        column = next((c for c in ("conversations", "messages") if c in dataset.column_names), None)
        if column is None:
            raise KeyError(f"standardize_sharegpt: no 'conversations' or 'messages' column in {dataset.column_names}")
    names = _role_names(aliases_for_system, aliases_for_user, aliases_for_assistant)

    def convert(batch, indices):
        out = []
        for idx, convo in zip(indices, batch[column]):
            if not isinstance(convo, list):
                raise ValueError(f"standardize_sharegpt: row {idx}: {column!r} must be a list of messages, "
                                 f"got {type(convo).__name__}")
            messages = []
            for k, msg in enumerate(convo):
                role = _first(msg, "from", "role")
                content = _first(msg, "value", "content")
                if role is None or content is None:
                    raise ValueError(f"standardize_sharegpt: row {idx}, message {k}: needs 'from'/'role' and "
                                     f"'value'/'content' keys, got {msg!r}")
                key = str(role).lower()
                if key not in names:
                    raise ValueError(f"standardize_sharegpt: row {idx}, message {k}: unknown role {role!r}; "
                                     f"known aliases are {sorted(names)}")
                messages.append({"role": names[key], "content": content})
            out.append(messages)
        return {column: out}

    return dataset.map(convert, batched=True, with_indices=True, desc="Standardizing ShareGPT")
