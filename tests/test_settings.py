"""velotune.settings: every environment switch parsed in one place, one way (issue 15 item 3)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from velotune import settings

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "velotune"
README = Path(__file__).resolve().parents[1] / "README.md"

# Modules that still read one of the switches themselves (none left: the step plan reads
# settings.current()). The ratchet only tightens: a listed module that no longer reads one fails too.
KNOWN_OWN_READERS: set[str] = set()


@pytest.mark.parametrize("word", ["1", "true", "TRUE", " yes ", "On"])
def test_true_words(word):
    assert settings.parse_bool("VELOTUNE_X", word, default=False) is True


@pytest.mark.parametrize("word", ["0", "false", "No", " OFF "])
def test_false_words(word):
    assert settings.parse_bool("VELOTUNE_X", word, default=True) is False


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_empty_is_the_default(value):
    assert settings.parse_bool("VELOTUNE_X", value, default=True) is True
    assert settings.parse_bool("VELOTUNE_X", value, default=False) is False


@pytest.mark.parametrize("value", ["ture", "2", "y", "enabled"])
def test_anything_else_names_the_variable_and_the_allowed_values(value):
    with pytest.raises(ValueError) as info:
        settings.parse_bool("VELOTUNE_CUDA_GRAPHS", value, default=True)
    message = str(info.value)
    assert f"VELOTUNE_CUDA_GRAPHS={value!r}" in message
    assert "1/true/yes/on and 0/false/no/off" in message


def test_defaults_of_an_empty_environment():
    got = settings.parse({})
    assert got == settings.Settings()
    assert (got.disable_kernels, got.return_logits, got.cuda_graphs, got.triton_fast_launch, got.hub_offline) == (
        False, False, True, True, False)
    assert got.cache_dir == Path.home() / ".cache" / "velotune"


def test_every_field_from_its_variable(tmp_path):
    env = {"VELOTUNE_DISABLE_KERNELS": "1", "VELOTUNE_RETURN_LOGITS": "yes", "VELOTUNE_CUDA_GRAPHS": "0",
           "VELOTUNE_TRITON_FAST_LAUNCH": "off", "VELOTUNE_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    assert settings.parse(env) == settings.Settings(
        disable_kernels=True, return_logits=True, cuda_graphs=False, triton_fast_launch=False, cache_dir=tmp_path,
        hub_offline=True)
    assert settings.parse({"VELOTUNE_CACHE": "~/elsewhere"}).cache_dir == Path.home() / "elsewhere"


def test_hub_offline_reads_what_huggingface_hub_reads():
    """huggingface_hub is offline with HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE; the first one set decides."""
    assert settings.parse({"TRANSFORMERS_OFFLINE": "1"}).hub_offline
    assert not settings.parse({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}).hub_offline
    with pytest.raises(ValueError, match="TRANSFORMERS_OFFLINE='sure'"):
        settings.parse({"TRANSFORMERS_OFFLINE": "sure"})


def test_current_follows_the_environment(monkeypatch):
    monkeypatch.delenv("VELOTUNE_CUDA_GRAPHS", raising=False)
    first = settings.current()
    assert settings.current() is first  # unchanged environment: nothing parsed again
    monkeypatch.setenv("VELOTUNE_CUDA_GRAPHS", "0")
    assert settings.current().cuda_graphs is False
    monkeypatch.setenv("VELOTUNE_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="VELOTUNE_CUDA_GRAPHS='maybe'"):
        settings.current()
    monkeypatch.delenv("VELOTUNE_CUDA_GRAPHS")
    assert settings.current().cuda_graphs is True


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        settings.current().cuda_graphs = False


def test_readme_table_lists_every_switch():
    text = README.read_text()
    for variables, values, default, what in settings.describe():
        row = f"| {variables} | {values} | {default} | {what} |"
        assert row in text, f"README's table of environment switches lacks (or differs from) the row:\n{row}"


def _own_readers() -> set[str]:
    """Modules other than settings.py that access os.environ/os.getenv and name a switch's variable (or any
    VELOTUNE_* name: a new switch belongs in settings.py and the README table)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        reads = any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os"
                    and n.attr in ("environ", "getenv") for n in ast.walk(tree))
        names = any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and (n.value in settings.VARIABLES or n.value.startswith("VELOTUNE_")) for n in ast.walk(tree))
        if reads and names:
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_no_module_reads_a_switch_itself():
    new = _own_readers() - KNOWN_OWN_READERS
    assert not new, f"{sorted(new)} read an environment switch themselves; use velotune.settings.current()"


def test_known_own_readers_still_read():
    gone = KNOWN_OWN_READERS - _own_readers()
    assert not gone, f"switched to settings, well done: remove {sorted(gone)} from KNOWN_OWN_READERS"
