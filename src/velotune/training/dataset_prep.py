"""Dataset checks, truncation with a count, packing that remembers which rows it packed.

TRL tokenizes and masks the dataset; velotune then truncates/packs it itself so that it can
(1) say how many rows were cut at max_seq_length instead of cutting silently, (2) fail with a
clear message when nothing trainable is left, and (3) carry each token's source row
(`sample_index`) through packing, so a non-finite loss can name the rows of its batch.
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset

logger = logging.getLogger("velotune")

SAMPLE_INDEX = "sample_index"
IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_start", "keep_end")


def check_text_field(dataset, text_field: str, formatting_func, name: str) -> None:
    """Fail before any work when the dataset is empty or lacks the column the trainer will read."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"the {name} dataset is empty (0 rows); pass a dataset with at least one example")
    columns = list(dataset.column_names or [])
    if formatting_func is not None or not columns:
        return
    formats = ("input_ids", "messages", "conversations", "prompt", "text")
    if text_field in columns or any(c in columns for c in formats if c != "text"):
        return
    raise ValueError(
        f"the {name} dataset has no column {text_field!r} (dataset_text_field); its columns are {columns}. "
        f"Set dataset_text_field to one of them, map your rows into a {text_field!r} column, or pass "
        "formatting_func")


def as_dataset(rows, name: str):
    """A list of row dicts (the docs' vision notebooks pass one: `[convert_to_conversation(s) for s in
    dataset]`) -> a `Dataset` (PIL images become its Image feature); TRL's trainer takes no list."""
    if not isinstance(rows, (list, tuple)):
        return rows
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"the {name} dataset is a list whose rows are not all dicts; pass a datasets.Dataset or a "
                         "list of dicts such as {'messages': [...]}")
    return Dataset.from_list(list(rows))


def check_text_values(dataset, text_field: str, formatting_func, name: str) -> None:
    """A text row that is None or not a string fails here, naming the row (TRL's error would not)."""
    if formatting_func is not None or not isinstance(dataset, Dataset) or text_field not in dataset.column_names:
        return
    if any(c in dataset.column_names for c in ("input_ids", "messages", "prompt")):
        return  # TRL reads those instead of the text column
    for i, value in enumerate(dataset[text_field]):
        if not isinstance(value, str):
            raise ValueError(f"row {i} (0-based) of the {name} dataset: {text_field!r} is "
                             f"{'None' if value is None else type(value).__name__ + ' ' + repr(value)[:60]}, "
                             f"not text. Fill or drop that row, e.g. dataset.filter(lambda r: r[{text_field!r}] "
                             "is not None)")


STANDARD_ROLES = ("system", "user", "assistant", "tool")


def _needs_standardizing(conversations) -> bool:
    for conversation in conversations:
        for message in conversation or ():
            if not isinstance(message, dict):
                return False  # not messages at all: TRL's own error applies
            if message.get("from") is not None or message.get("value") is not None:
                return True  # ShareGPT keys (Arrow gives every message every key, so look at the values)
            role = message.get("role")
            if role is not None and role not in STANDARD_ROLES:
                return True  # e.g. human/gpt under "role"; a tool call's content may be None, that is fine
    return False


def standardize_roles(dataset, name: str):
    """Raw ShareGPT rows (`from`/`value`, `human`/`gpt`) -> `messages` with role/content and the
    roles chat templates know, with a one-line notice; an unknown role is an error naming the fix.
    Without this TRL would render `human`/`gpt` turns (or none) and train on them silently."""
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return dataset
    column = next((c for c in ("messages", "conversations") if c in dataset.column_names), None)
    if column is None or not _needs_standardizing(dataset[column]):
        return dataset
    from ..data.sharegpt import standardize_sharegpt

    try:
        dataset = standardize_sharegpt(dataset, column=column)
    except ValueError as exc:
        raise ValueError(f"the {name} dataset's {column!r} column holds ShareGPT-style messages that cannot be "
                         f"mapped to system/user/assistant: {exc}. Map its roles yourself with "
                         "velotune.chat_templates.standardize_sharegpt(dataset, aliases_for_user=[...], "
                         "aliases_for_assistant=[...]) before building the trainer") from None
    if column != "messages" and "messages" not in dataset.column_names:
        dataset = dataset.rename_column(column, "messages")
    logger.warning("velotune: the %s dataset's %r column holds ShareGPT messages (from/value); standardized them "
                   "to role/content with standardize_sharegpt (as 'messages')", name, column)
    return dataset


def _per_token_columns(dataset: Dataset) -> list[str]:
    """Columns holding one value per token (lists as long as input_ids in the first row)."""
    first = dataset[0]
    length = len(first["input_ids"])
    return [c for c in dataset.column_names
            if isinstance(first[c], list) and len(first[c]) == length and c != SAMPLE_INDEX]


def truncate_and_count(dataset: Dataset, max_length: int, mode: str, name: str, num_proc=None) -> Dataset:
    """Cut rows longer than max_length (one log line with the count), drop rows left without labels."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={mode!r}: allowed values are {TRUNCATION_MODES}")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = sum(length > max_length for length in lengths)
    if too_long:
        logger.warning("velotune: %d of %d %s rows are longer than max_seq_length=%d tokens (longest %d); "
                       "they are truncated (%s)", too_long, len(lengths), name, max_length, max(lengths), mode)
        columns = _per_token_columns(dataset)
        cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        dataset = dataset.map(lambda row: {c: row[c][cut] for c in columns}, num_proc=num_proc,
                              desc=f"Truncating {name} dataset")
    if "labels" in dataset.column_names:
        before = len(dataset)
        dataset = dataset.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]), num_proc=num_proc)
        if len(dataset) < before:
            logger.warning("velotune: %d %s rows have no trained token (all labels -100) and are skipped",
                           before - len(dataset), name)
    return dataset


def trainable_tokens(row: dict, cut: int | None, mode: str, completion_only_loss, assistant_only_loss) -> int:
    """Tokens of one tokenized row that get a loss: not masked, inside max_length, and not the first
    (the label shift: token 0 is never predicted)."""
    n = len(row["input_ids"])
    trained = [True] * n
    if row.get("labels") is not None:
        trained = [t != IGNORE_INDEX for t in row["labels"]]
    if completion_only_loss is not False and row.get("completion_mask") is not None:
        trained = [t and bool(m) for t, m in zip(trained, row["completion_mask"])]
    if assistant_only_loss and row.get("assistant_masks") is not None:
        trained = [t and bool(m) for t, m in zip(trained, row["assistant_masks"])]
    if cut is not None and n > cut:
        trained = trained[:cut] if mode != "keep_end" else trained[-cut:]
    return sum(trained[1:])


def drop_untrainable(dataset: Dataset, name: str, cut: int | None, mode: str, completion_only_loss=None,
                     assistant_only_loss=False) -> Dataset:
    """Count the rows with no trained token; all of them: an error before training; some: a notice with
    the count and the first row numbers, and those rows are skipped."""
    def count(row):
        return {"_velotune_trained": trainable_tokens(row, cut, mode, completion_only_loss, assistant_only_loss)}

    counted = dataset.map(count, desc=f"Counting trained tokens of {name} dataset")
    empty = [row for row, n in zip(counted[SAMPLE_INDEX], counted["_velotune_trained"]) if n == 0]
    if not empty:
        return dataset
    shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
    if len(empty) == len(dataset):
        raise ValueError(
            f"none of the {len(dataset)} rows of the {name} dataset has a token to train on after tokenizing, "
            f"masking and the label shift (rows {shown}, 0-based); nothing was trained. Typical causes: empty "
            "text, rows of one token, prompts without completions, or max_seq_length cutting off every completion")
    logger.warning("velotune: %d of %d %s rows have no token to train on after tokenizing, masking and the label "
                   "shift (e.g. empty text); they are skipped: rows %s (0-based)", len(empty), len(dataset), name,
                   shown)
    keep = counted.filter(lambda row: row["_velotune_trained"] > 0)
    return keep.remove_columns("_velotune_trained")


def pack(dataset: Dataset, max_length: int, strategy: str, name: str, num_proc=None) -> Dataset:
    """TRL's packing over the per-token columns plus a per-token `sample_index` (the source row)."""
    from trl import pack_dataset

    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = sum(length > max_length for length in lengths)
    if too_long and strategy == "bfd":
        logger.warning("velotune: %d of %d %s rows are longer than max_seq_length=%d tokens; packing truncates "
                       "them (packing_strategy='bfd_split' keeps the rest as a new row)",
                       too_long, len(lengths), name, max_length)
    columns = _per_token_columns(dataset)
    dataset = dataset.map(lambda row: {SAMPLE_INDEX: [row[SAMPLE_INDEX]] * len(row["input_ids"])},
                          num_proc=num_proc)
    dataset = dataset.select_columns(columns + [SAMPLE_INDEX])
    map_kwargs = {"num_proc": num_proc, "desc": f"Packing {name} dataset"}
    return pack_dataset(dataset, max_length, strategy, map_kwargs)


def require_rows(dataset, name: str) -> None:
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"the {name} dataset has no rows left after tokenizing, truncating and dropping rows "
                         "without trained tokens (e.g. every completion was cut off or masked); check the "
                         "text column, max_seq_length and any response-only masking")


class SampleIndexCollator:
    """Wraps a collator: takes `sample_index` off each example and adds the batch's sorted row numbers."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        rows: set[int] = set()
        stripped = []
        for example in examples:
            example = dict(example)
            index = example.pop(SAMPLE_INDEX, None)
            if index is not None:
                rows.update(index if isinstance(index, list) else [index])
            stripped.append(example)
        batch = self.inner(stripped)
        if rows:
            batch[SAMPLE_INDEX] = torch.tensor(sorted(rows), dtype=torch.long)  # (S,)
        return batch
