"""The documentation's code blocks, read from the seed file at test time, and a runner that executes
one as written after named, visible substitutions.

Why read the seed instead of copying snippets into tests: the tests then run the docs' own text, and
a doc that changes under a test is noticed (a substitution whose target is gone fails, naming it).
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

SEED_NAME = "000_af39fd029770a92c.txt"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
# A line that only Python (or a notebook cell) has: an import, an assignment from a call, a call.
PYTHON_LINE = re.compile(r"^\s*(from [\w.]+ import |import [\w.]+|[\w.\[\]\"']+ = .*\(|[\w.]+\.\w+\(|\w+\()", re.M)


VENDORED = Path(__file__).with_name("docs_code_blocks.md")
VENDORED_HEADER = (
    "# The fenced code blocks of the Unsloth documentation ({seed}), in order, nothing else.\n"
    "# Test data for tests/docs: CI has no copy of the documentation beside the checkout. Written by\n"
    "# `python tests/docs/snippets.py` from ../shared/seed/; test_coverage.py checks it still equals them.\n"
)


def seed_path() -> Path:
    """The Unsloth documentation (VELOTUNE_DOCS_SEED, or `shared/seed/` beside the checkout), else the copy of
    its code blocks kept in the repository (all the tests read)."""
    candidates = [os.environ.get("VELOTUNE_DOCS_SEED"), REPO.parent / "shared" / "seed" / SEED_NAME,
                  REPO / "shared" / "seed" / SEED_NAME, VENDORED]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(f"neither the documentation {SEED_NAME} (../shared/seed/ or shared/seed/) nor "
                            f"{VENDORED} exists; set VELOTUNE_DOCS_SEED=/path/to/it")


def vendored_text(seed_text: str) -> str:
    """The repository's copy: the header, then each fenced block of `seed_text` as a fenced block."""
    blocks = code_blocks(seed_text)
    return VENDORED_HEADER.format(seed=SEED_NAME) + "".join(f"\n```\n{b.text}\n```\n" for b in blocks)


@dataclass(frozen=True)
class Block:
    """One fenced code block of the docs: its first line number (1-based, the line after the fence)."""

    line: int
    text: str

    @property
    def is_python(self) -> bool:
        """Python as the docs mean it: parses, or has a Python line (cells elide with `....`, mix in
        `pip install` or `!shell` lines)."""
        try:
            ast.parse(self.text)
            return True
        except SyntaxError:
            return PYTHON_LINE.search(self.text) is not None


def code_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the seed, in order (the pages repeat a few; those are kept apart)."""
    lines = (seed_path().read_text(encoding="utf-8") if text is None else text).split("\n")
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if not line.startswith("```"):
            continue
        if start is None:
            start = number
        else:
            blocks.append(Block(start + 1, "\n".join(lines[start:number - 1])))
            start = None
    return blocks


def find_block(marker: str, exact: bool = False) -> Block:
    """The one distinct block containing `marker` (identical copies on other pages count once);
    `exact`: the block's whole text is `marker` (one-line parameter blocks recur inside others)."""
    found = {}
    for block in code_blocks():
        if (block.text.strip() == marker.strip()) if exact else (marker in block.text):
            found.setdefault(block.text, block)
    if len(found) != 1:
        lines = [b.line for b in found.values()]
        raise AssertionError(f"marker {marker!r} must pick exactly one docs snippet, found {len(found)} "
                             f"(lines {lines}): the docs changed; update the test's marker")
    return next(iter(found.values()))


@dataclass(frozen=True)
class Sub:
    """One named replacement in a snippet's text; `old` must occur (else the docs changed)."""

    old: str
    new: str
    why: str


# What every snippet gets: the package's name.
VELOTUNE = (Sub("from unsloth", "from velotune", "the package is velotune"),)


def substitute(text: str, subs) -> str:
    for sub in subs:
        if sub.old not in text:
            raise AssertionError(f"substitution target {sub.old!r} ({sub.why}) is not in the docs' snippet any "
                                 "more: the docs changed; update the test")
        text = text.replace(sub.old, sub.new)
    return text


def run_snippet(block: Block, subs=(), namespace: dict | None = None) -> dict:
    """Execute the block's text after `subs` in `namespace` (the earlier notebook cells' names);
    return the namespace. Runs in the current directory: callers chdir to a temporary one."""
    code = substitute(block.text, subs)
    scope = {"__name__": "__docs__"} if namespace is None else namespace
    exec(compile(code, f"<docs line {block.line}>", "exec"), scope)  # noqa: S102 - running the docs is the test
    return scope


def run_statements(block: Block, subs=(), namespace: dict | None = None) -> list[tuple[str, BaseException | None]]:
    """Execute the block one top-level statement at a time, like lines typed into a notebook, and
    return each statement's text with the exception it raised (None when it ran). For snippets whose
    lines are independent alternatives, e.g. a local save and a hub push that must fail offline."""
    code = substitute(block.text, subs)
    scope = {"__name__": "__docs__"} if namespace is None else namespace
    results = []
    for statement in ast.parse(code).body:
        source = ast.get_source_segment(code, statement)
        try:
            exec(compile(ast.Module([statement], []), f"<docs line {block.line}>", "exec"), scope)  # noqa: S102
            results.append((source, None))
        except Exception as error:  # noqa: BLE001 - returned to the test, which decides
            results.append((source, error))
    return results


if __name__ == "__main__":  # refresh the repository's copy from the documentation beside the checkout
    source = REPO.parent / "shared" / "seed" / SEED_NAME
    VENDORED.write_text(vendored_text(source.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{VENDORED}: {len(code_blocks(source.read_text(encoding='utf-8')))} blocks from {source}")
