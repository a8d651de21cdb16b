"""`train_on_responses_only(trainer, instruction_part, response_part)`: mask every label of a
(TRL or transformers) trainer's datasets except the assistant's answers.

It never trains silently on nothing: when the markers match no row it raises, naming the markers
and showing a rendered row; when they match only some rows it warns with the count and drops the
rows that would have no trained token.
"""

from __future__ import annotations

import warnings

from .masking import IGNORE_INDEX, DataCollatorForResponseOnly, ResponseMarkerError, ResponseMasker
from .registry import CHAT_TEMPLATES, get_template_record
from .templates import read_name_tag

CHECK_ROWS = 64  # rows checked before the whole dataset is mapped, to fail fast


def _tokenizer_of(trainer):
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # processors wrap the tokenizer
    if tok is None:
        raise ValueError("train_on_responses_only: the trainer has no tokenizer (processing_class)")
    return tok


def infer_markers(tokenizer, sample_ids=None) -> tuple[str, str]:
    """Markers of the tokenizer's chat template: from the registry name `get_chat_template`
    recorded, else the first registry format whose markers both occur in a sample row."""
    tag = read_name_tag(getattr(tokenizer, "chat_template", None))
    if tag is not None:
        record = get_template_record(tag[0])
        return record.instruction_part, record.response_part
    if sample_ids is not None:
        text = tokenizer.decode(list(sample_ids), skip_special_tokens=False)
        for record in CHAT_TEMPLATES.values():
            if record.instruction_part in text and record.response_part in text:
                return record.instruction_part, record.response_part
    raise ValueError("train_on_responses_only: cannot infer the markers from the tokenizer's chat template; "
                     "pass instruction_part=... and response_part=... as they appear in the rendered text")


def _truncation_note(dataset, n_check: int, max_length) -> str:
    """When the checked rows are all exactly max_seq_length long, truncation cut the marker off."""
    if not max_length or n_check == 0:
        return ""
    cut = sum(len(dataset[i]["input_ids"]) >= max_length for i in range(n_check))
    if cut < n_check:
        return ""
    return (f" Every one of those rows is max_seq_length={max_length} tokens long: they were truncated, so the "
            "response marker was cut off with the answer. Raise max_seq_length (or shorten the prompts).")


def _mask_dataset(dataset, masker: ResponseMasker, name: str, max_length=None):
    """Add response-only labels; raise if no row matches, warn and drop rows that do not."""
    columns = dataset.column_names

    def row_result(row):
        return masker.mask_packed(row["input_ids"], row.get("labels"), row.get("seq_lengths"))

    n_check = min(CHECK_ROWS, len(dataset))
    checks = [row_result(dataset[i]) for i in range(n_check)]
    if n_check and not any(any(x != IGNORE_INDEX for x in r.labels) for r in checks):
        what = ("the response marker never occurs" if not any(r.responses for r in checks)
                else "no token follows a response marker")
        raise ResponseMarkerError(masker.describe_failure(
            dataset[0]["input_ids"], f"train_on_responses_only: in the first {n_check} rows of the {name} "
            f"dataset {what}; every label would be -100." + _truncation_note(dataset, n_check, max_length)))
    if not any(r.instructions for r in checks) and any(r.responses > 1 for r in checks):
        raise ResponseMarkerError(masker.describe_failure(
            dataset[0]["input_ids"], f"train_on_responses_only: the instruction marker never occurs in the "
            f"first {n_check} rows of the {name} dataset, although they hold multi-turn conversations; "
            "user turns would be trained as answers."))

    def add_labels(row):
        result = row_result(row)
        return {"labels": result.labels, "_velotune_trained": any(x != IGNORE_INDEX for x in result.labels)}

    dataset = dataset.map(add_labels, desc=f"Masking {name} dataset to responses only")
    trained = sum(dataset["_velotune_trained"])
    if trained == 0:
        raise ResponseMarkerError(masker.describe_failure(
            dataset[0]["input_ids"], f"train_on_responses_only: no row of the {name} dataset has a response."))
    if trained < len(dataset):
        warnings.warn(
            f"train_on_responses_only: the response marker {masker.response_part!r} matched only {trained} of "
            f"{len(dataset)} rows of the {name} dataset; the {len(dataset) - trained} rows without it (all labels "
            "-100, often truncated by max_length) are dropped.",
            UserWarning, stacklevel=3,
        )
        dataset = dataset.filter(lambda row: row["_velotune_trained"])
    keep = [c for c in dataset.column_names if c in columns or c == "labels"]
    return dataset.select_columns(keep)


def _warn_double_bos(tokenizer, ids) -> None:
    """Templates that write BOS themselves (Llama 3, Gemma, DeepSeek-R1, ...) get a second one when
    their rendered text is tokenized with special tokens added; the docs warn about exactly this."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        warnings.warn("train_on_responses_only: the first row starts with two BOS tokens: the chat template "
                      "writes BOS and tokenization added another. Tokenize rendered text with "
                      "add_special_tokens=False, or give the trainer conversations instead of text.",
                      UserWarning, stacklevel=3)


def _uses_labels_column(collator) -> bool:
    """TRL's SFT collator pads a precomputed `labels` column; others may rebuild labels."""
    cls = type(collator)
    return cls.__module__.startswith("trl.") and cls.__name__ == "DataCollatorForLanguageModeling"


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None):
    """Mask the trainer's train/eval datasets to responses only (in place) and return the trainer.

    Markers default to the chat template's (see `infer_markers`). The datasets must already be
    tokenized (SFTTrainer does that when it is built).
    """
    tokenizer = _tokenizer_of(trainer)
    if trainer.train_dataset is None or "input_ids" not in trainer.train_dataset.column_names:
        raise ValueError("train_on_responses_only needs a trainer whose train_dataset is tokenized (input_ids)")
    if instruction_part is None or response_part is None:
        inferred = infer_markers(tokenizer, trainer.train_dataset[0]["input_ids"])
        instruction_part = instruction_part if instruction_part is not None else inferred[0]
        response_part = response_part if response_part is not None else inferred[1]
    masker = ResponseMasker(tokenizer, instruction_part, response_part)
    _warn_double_bos(tokenizer, trainer.train_dataset[0]["input_ids"])

    args = getattr(trainer, "args", None)
    max_length = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
    trainer.train_dataset = _mask_dataset(trainer.train_dataset, masker, "train", max_length)
    eval_ds = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_ds, dict):
        trainer.eval_dataset = {k: _mask_dataset(v, masker, f"eval[{k}]", max_length) for k, v in eval_ds.items()}
    elif eval_ds is not None:
        trainer.eval_dataset = _mask_dataset(eval_ds, masker, "eval", max_length)
    if not _uses_labels_column(trainer.data_collator):
        trainer.data_collator = DataCollatorForResponseOnly(tokenizer, instruction_part, response_part)
    return trainer
