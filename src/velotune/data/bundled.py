"""Small datasets shipped with velotune for examples and tests (files in `data/bundled/`).

    load_bundled("instructions")   300 Alpaca rows: instruction / input / output
    load_bundled("conversations")  300 ShareGPT rows: conversations = [{from, value}, ...]
    load_bundled("arithmetic")     200 GSM8K-style rows: prompt / answer / solution

The files are written by `python -m velotune.data.bundled` from the generators in
`velotune.data.synthetic`; a test checks the shipped files equal a fresh build.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from .synthetic import arithmetic_word_problems, conversation_rows, instruction_rows

BUNDLED = {
    "instructions": ("instructions.jsonl", lambda: instruction_rows(300, seed=0)),
    "conversations": ("conversations.jsonl", lambda: conversation_rows(300, seed=1)),
    "arithmetic": ("arithmetic.jsonl", lambda: arithmetic_word_problems(200, seed=0)),
}


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise KeyError(f"no bundled dataset {name!r}; choose from {sorted(BUNDLED)}")
    return Path(str(resources.files("velotune.data") / "bundled" / BUNDLED[name][0]))


def bundled_rows(name: str) -> list[dict]:
    with open(bundled_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_bundled(name: str):
    """The bundled file as a `datasets.Dataset`."""
    from datasets import Dataset

    return Dataset.from_list(bundled_rows(name))


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_bundled(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for filename, build in BUNDLED.values():
        (directory / filename).write_text(render_jsonl(build()), encoding="utf-8")


if __name__ == "__main__":
    write_bundled(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "bundled")
