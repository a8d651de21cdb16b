"""Every Python block of the docs has a test here (possibly skipped for an open issue) or a written
reason why it is not a velotune snippet; see registry.py. A new or changed doc block fails this."""

from __future__ import annotations

import ast
from pathlib import Path

from .registry import FRAGMENTS, NOT_VELOTUNE, SNIPPETS
from .snippets import REPO, SEED_NAME, VENDORED, code_blocks, vendored_text

HERE = Path(__file__).parent


def entries_for(block) -> list[str]:
    exact = [key for key in FRAGMENTS if block.text.strip() == key.strip()]
    return exact or [key for key in (*SNIPPETS, *NOT_VELOTUNE) if key in block.text]


def test_every_python_block_is_tested_or_explained():
    python = [block for block in code_blocks() if block.is_python]
    assert len(python) >= 50, f"only {len(python)} Python blocks found: is the seed file the docs?"
    unclaimed = [f"line {b.line}: {b.text.splitlines()[0][:70]!r}" for b in python if not entries_for(b)]
    ambiguous = [f"line {b.line}: {entries_for(b)}" for b in python if len(entries_for(b)) > 1]
    assert not unclaimed, ("docs Python blocks with no test and no reason; add a test under tests/docs and a "
                           "marker in registry.py:\n" + "\n".join(unclaimed))
    assert not ambiguous, "blocks matched by several registry markers:\n" + "\n".join(ambiguous)


def test_every_registry_entry_matches_a_block():
    blocks = code_blocks()
    stale = [key for key in FRAGMENTS if not any(b.text.strip() == key.strip() for b in blocks)]
    stale += [key for key in (*SNIPPETS, *NOT_VELOTUNE) if not any(key in b.text for b in blocks)]
    assert not stale, f"registry markers no docs block contains any more: {stale}"


def test_named_tests_exist_and_read_their_block():
    """Each named test function exists and holds its block's marker as a string (fragment tests call
    `fragments(...)`), so the registry cannot claim a test that runs some other snippet."""
    problems = []
    for marker, target in [*SNIPPETS.items(), *FRAGMENTS.items()]:
        module, name = target.split("::")
        tree = ast.parse((HERE / f"{module}.py").read_text(encoding="utf-8"))
        functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in functions:
            problems.append(f"{target}: no such test")
            continue
        nodes = list(ast.walk(functions[name]))
        strings = {node.value for node in nodes if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        calls = {node.func.id for node in nodes if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        if marker not in strings and not (marker in FRAGMENTS and "fragments" in calls):
            problems.append(f"{target}: does not read its block by the marker {marker!r}")
    assert not problems, "\n".join(problems)


def test_not_velotune_reasons_are_written():
    assert all(len(reason) > 20 for reason in NOT_VELOTUNE.values())


def test_the_repository_copy_equals_the_documentation():
    """CI reads docs_code_blocks.md; where the documentation itself is at hand, the copy must equal its blocks."""
    import pytest

    seed = REPO.parent / "shared" / "seed" / SEED_NAME
    if not seed.is_file():
        pytest.skip("the documentation is not beside this checkout (CI): the copy is what the tests read")
    expected = vendored_text(seed.read_text(encoding="utf-8"))
    assert VENDORED.read_text(encoding="utf-8") == expected, "refresh it: python tests/docs/snippets.py"
    assert [b.text for b in code_blocks(expected)] == [b.text for b in code_blocks(seed.read_text(encoding="utf-8"))]
