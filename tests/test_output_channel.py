"""One output channel (issue 15 item 3): the library logs through the `velotune` logger, which a script
that configured no logging still sees on its terminal; progress bars and the command line print."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "velotune"
SRC = str(PACKAGE.parent)

# The command line (velotune.cli, velotune.cli_*) prints by design; nothing else in the library does
# (the list only shrinks, and it is empty).
KNOWN_PRINTERS: set[str] = set()


def _printers() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
               for n in ast.walk(tree)):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return {name for name in found if not (name == "velotune.cli" or name.startswith("velotune.cli_"))}


def test_the_library_does_not_print():
    new = _printers() - KNOWN_PRINTERS
    assert not new, f"{sorted(new)} call print(); log through logging.getLogger('velotune') instead"


def test_known_printers_still_print():
    gone = KNOWN_PRINTERS - _printers()
    assert not gone, f"moved to logging, well done: remove {sorted(gone)} from KNOWN_PRINTERS"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r})\n" + code],
                          capture_output=True, text=True, timeout=300)


def test_a_script_without_logging_set_up_sees_info_on_stderr():
    done = _run("import logging, velotune\n"
                "logging.getLogger('velotune.training').info('velotune: trained 2 steps')\n"
                "logging.getLogger('velotune').debug('velotune: not shown')\n"
                "logging.getLogger('someone.else').info('not ours')\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["velotune: trained 2 steps"]
    assert done.stdout == ""


def test_an_application_that_set_up_logging_gets_each_line_once():
    done = _run("import logging, velotune\n"
                "logging.basicConfig(format='APP %(name)s %(message)s')\n"
                "logging.getLogger('velotune').info('velotune: saved')\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["APP velotune velotune: saved"]


def test_the_level_a_user_set_is_kept():
    done = _run("import logging\n"
                "logging.getLogger('velotune').setLevel(logging.WARNING)\n"
                "import velotune\n"
                "logging.getLogger('velotune').info('velotune: hidden')\n"
                "logging.getLogger('velotune').warning('velotune: shown')\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["velotune: shown"]
