"""Load local JSON / JSONL / CSV / Parquet / Excel files through `datasets`, and check each row
against one of the docs' formats, so a bad row fails with its file, row number and problem
instead of a shape error deep inside training.

Row numbers are 1-based data rows (the header of a CSV/Excel file is not counted; for JSONL they
are the line numbers when the file has no blank lines).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable

logger = logging.getLogger("velotune")

FORMATS = ("text", "alpaca", "sharegpt", "openai", "dpo", "kto", "grpo")
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
               ".xlsx": "excel", ".xls": "excel"}


class DataFormatError(ValueError):
    """A file that cannot be used as training data; the message names file, row and problem."""

    def __init__(self, path, row: int | None, problem: str):
        self.path, self.row, self.problem = str(path), row, problem
        where = f"{self.path}, row {row}" if row is not None else self.path
        super().__init__(f"{where}: {problem}")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(row: dict, key: str, *, optional: bool = False) -> str | None:
    if key not in row or _missing(row[key]):
        if optional:
            return None
        # Arrow gives every row every column, so a key absent from one JSON row reads as None.
        raise ValueError(f"missing column {key!r}" if key not in row else f"column {key!r} is missing or empty")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"column {key!r} must be text, got {type(value).__name__} {value!r}")
    if not optional and not value.strip():
        raise ValueError(f"column {key!r} is empty")
    return value


def _messages(value, key: str, alternate: bool) -> None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"column {key!r} must be a list of messages, got a string that is not JSON") from None
    if not isinstance(value, list):
        raise ValueError(f"column {key!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"column {key!r} is an empty conversation")
    roles = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"message {k} must be an object, got {type(msg).__name__}")
        role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        if role is None or content is None:
            raise ValueError(f"message {k} needs 'role'/'from' and 'content'/'value', got keys {sorted(msg)}")
        if not isinstance(content, (str, list)):
            raise ValueError(f"message {k}: content must be text, got {type(content).__name__}")
        role = {"human": "user", "gpt": "assistant", "model": "assistant"}.get(str(role).lower(), str(role).lower())
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {k} has unknown role {role!r}")
        roles.append(role)
    opening = next((k for k, r in enumerate(roles) if r != "system"), len(roles))
    if "system" in roles[opening:]:
        raise ValueError(f"message {roles.index('system', opening)}: a system message may only open the conversation")
    turns = roles[opening:]
    if "assistant" not in turns:
        raise ValueError("the conversation has no assistant message to train on")
    if alternate:
        for k, role in enumerate(turns):
            expected = "user" if k % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"roles must alternate user/assistant starting with user; turn {k} is {role!r}")


def _check_alpaca(row):
    _text(row, "instruction")
    _text(row, "input", optional=True)
    _text(row, "output")


def _check_kto(row):
    _text(row, "prompt")
    _text(row, "completion")
    if not isinstance(row.get("label"), bool):
        raise ValueError(f"column 'label' must be true/false, got {row.get('label')!r}")


def _check_grpo(row):
    _text(row, "prompt")
    if "answer" not in row or _missing(row["answer"]):
        raise ValueError("missing column 'answer'")
    if not isinstance(row["answer"], (str, int, float)):
        raise ValueError(f"column 'answer' must be text or a number, got {type(row['answer']).__name__}")


_CHECKS: dict[str, Callable[[dict, bool], None]] = {
    "text": lambda row, alt: _text(row, "text"),
    "alpaca": lambda row, alt: _check_alpaca(row),
    "sharegpt": lambda row, alt: _messages(row.get("conversations"), "conversations", alt),
    "openai": lambda row, alt: _messages(row.get("messages"), "messages", alt),
    "dpo": lambda row, alt: [_text(row, k) for k in ("prompt", "chosen", "rejected")],
    "kto": lambda row, alt: _check_kto(row),
    "grpo": lambda row, alt: _check_grpo(row),
}


def detect_format(columns) -> str:
    """Guess the docs' format from column names (first match wins)."""
    cols = set(columns)
    for fmt, needed in (("dpo", {"prompt", "chosen", "rejected"}), ("kto", {"prompt", "completion", "label"}),
                        ("grpo", {"prompt", "answer"}), ("sharegpt", {"conversations"}), ("openai", {"messages"}),
                        ("alpaca", {"instruction", "output"}), ("text", {"text"})):
        if needed <= cols:
            return fmt
    raise ValueError(f"cannot tell the data format from columns {sorted(cols)}; expected one of {FORMATS}")


def validate_dataset(dataset, format: str | None = None, *, source="dataset", alternate_roles: bool = True) -> str:
    """Check every row of `dataset`; return the format. Raises `DataFormatError` on the first bad row."""
    if len(dataset) == 0:
        raise DataFormatError(source, None, "the file holds no rows")
    try:
        fmt = format or detect_format(dataset.column_names)
    except ValueError as exc:
        raise DataFormatError(source, None, str(exc)) from None
    if fmt not in _CHECKS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    for i, row in enumerate(dataset):
        try:
            _CHECKS[fmt](row, alternate_roles)
        except ValueError as exc:
            raise DataFormatError(source, i + 1, f"{exc} ({fmt} format)") from None
    return fmt


def _diagnose_json(path: str) -> DataFormatError | None:
    """Find the row that made the JSON loader fail: bad JSON, or a column whose type changes."""
    bad = _first_non_utf8(path)
    if bad is not None:
        return bad
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    try:
        rows = json.loads(raw)
        if not isinstance(rows, list):
            return DataFormatError(path, None, "a .json file must hold a list of objects")
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                return DataFormatError(path, n, f"invalid JSON: {exc.msg}")
    types: dict[str, tuple[type, int]] = {}
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            return DataFormatError(path, n, f"each row must be an object, got {type(row).__name__}")
        for key, value in row.items():
            if value is None:
                continue
            kind = str if isinstance(value, str) else list if isinstance(value, list) else \
                dict if isinstance(value, dict) else float if isinstance(value, (int, float)) else type(value)
            first = types.setdefault(key, (kind, n))
            if first[0] is not kind:
                return DataFormatError(path, n, f"column {key!r} is {kind.__name__} here but "
                                                f"{first[0].__name__} in row {first[1]}")
    return None


def _first_non_utf8(path: str, header_lines: int = 0) -> DataFormatError | None:
    """The first line holding bytes that are not UTF-8 (the loaders' bare UnicodeDecodeError names neither).
    The row is the line number less the header lines (a CSV's header is not a data row)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = (f"line {n} is not valid UTF-8 (byte {line[exc.start]:#04x} at column {exc.start + 1}); "
                           "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8")
                return DataFormatError(path, max(n - header_lines, 1), problem)
    return None


def _diagnose_csv(path: str) -> DataFormatError | None:
    bad = _first_non_utf8(path, header_lines=1)
    if bad is not None:
        return bad
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    return DataFormatError(path, None, "the file holds no rows") if len(lines) <= 1 else None


def _read_excel(path: str):
    try:
        import openpyxl  # noqa: F401  (pandas needs it for .xlsx)
    except ImportError:
        raise ImportError(f"reading {path} needs openpyxl: pip install openpyxl") from None
    import pandas as pd
    from datasets import Dataset

    # Spreadsheets hold text the user typed: "4" in a cell is an answer, not a number. Read every
    # cell as text, keep empty cells empty, and give KTO's TRUE/FALSE label column back its booleans.
    frame = pd.read_excel(path, dtype=str)
    frame = frame.astype(object).where(frame.notna(), None)
    if "label" in frame.columns:
        frame["label"] = frame["label"].map({"True": True, "False": False, "TRUE": True, "FALSE": False}.get)
    return Dataset.from_pandas(frame, preserve_index=False)


_KNOWN_COLUMNS = ("text", "instruction", "input", "output", "conversations", "messages", "prompt", "chosen",
                  "rejected", "completion", "label", "answer")


def _lowercase_known_columns(dataset, source: str):
    """The docs write Alpaca columns as "Instruction"/"Input"/"Output"; accept any capitalisation of
    a known column name by renaming it to the lowercase name the formats use (never over an existing one)."""
    renames = {c: c.lower() for c in dataset.column_names
               if c != c.lower() and c.lower() in _KNOWN_COLUMNS and c.lower() not in dataset.column_names}
    if renames:
        logger.info("velotune: %s: renamed columns %s to the lowercase names the data formats use", source, renames)
        dataset = dataset.rename_columns(renames)
    return dataset


def load_local_dataset(path, format: str | None = None, *, alternate_roles: bool = True, validate: bool = True):
    """Load one local file as a `datasets.Dataset` and validate it (see `validate_dataset`).

    format: one of FORMATS, or None to detect it from the columns.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataFormatError(path, None, "is a directory; pass one data file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise DataFormatError(path, None, f"unsupported extension {ext!r}; use one of {sorted(_EXTENSIONS)}")
    if os.path.getsize(path) == 0:
        raise DataFormatError(path, None, "the file is empty")
    kind = _EXTENSIONS[ext]
    if kind in ("json", "csv"):  # Arrow reads bad bytes without complaint and fails on first access
        bad = _first_non_utf8(path, header_lines=1 if kind == "csv" else 0)
        if bad is not None:
            raise bad
    if kind == "excel":
        dataset = _read_excel(path)
    else:
        import datasets

        try:
            dataset = datasets.load_dataset(kind, data_files=path, split="train")
        except Exception as exc:  # the builders' errors name neither the row nor the problem
            found = _diagnose_json(path) if kind == "json" else _diagnose_csv(path) if kind == "csv" else None
            if found is not None:
                raise found from exc
            raise DataFormatError(path, None, f"could not be read as {kind}: {exc}") from exc
    dataset = _lowercase_known_columns(dataset, path)
    if validate:
        validate_dataset(dataset, format, source=path, alternate_roles=alternate_roles)
    return dataset
