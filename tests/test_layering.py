"""The package's import directions (DESIGN.md section 2, issue 15): each layer imports only the layers below it.

Every `import` of a velotune module, function-local ones included, is read from the source (AST, nothing
is imported) and checked against the layer map below, the layout of DESIGN.md section 2 (the package map
in docs/decisions.md, "Architecture", says what each layer holds). `KNOWN_UPWARD` lists the upward imports that exist today; a new
one fails, and so does a listed one that is gone (delete it from the list: the ratchet only tightens).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "velotune"

# Higher numbers may import lower ones (and their own layer); first matching prefix wins.
LAYERS = [
    ("velotune.cli", 90), ("velotune.cli_checks", 90), ("velotune.cli_launch", 90),
    ("velotune.chat_templates", 85),
    ("velotune.training", 80), ("velotune.rl", 80),
    ("velotune.fast_language_model", 70), ("velotune.vision", 70), ("velotune.quantize", 70),
    ("velotune.lora", 60),
    ("velotune.export", 50),
    ("velotune.inference", 40),
    ("velotune.models", 30),
    ("velotune.fast", 20),
    ("velotune.kernels", 10), ("velotune.quant", 10),
    ("velotune.data", 0), ("velotune.resolve", 0), ("velotune.settings", 0), ("velotune.device", 0), ("velotune.launch", 0),
    ("velotune.tokenizer", 0), ("velotune.checkpoint_shards", 0), ("velotune.quiet", 0),
    ("velotune.rewards", 0),
]

# (importer, imported) pairs that go upward today; a new one fails, a listed one that is gone fails too.
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left: export/verify.py loads through models/from_folder.py


FACADE = 85  # `velotune/__init__.py`, the public names: only the command line imports it


def layer_of(module: str) -> int:
    if module == "velotune":
        return FACADE
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix if prefix.endswith("_") else prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layering.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def imported_modules(path: Path) -> set[str]:
    """The velotune modules `path` imports (`from pkg import submodule` resolves to the submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "velotune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "velotune":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found


def upward_imports() -> set[tuple[str, str]]:
    pairs = set()
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        for imported in imported_modules(path):
            if layer_of(imported) > layer_of(importer):
                pairs.add((importer, imported))
    return pairs


def test_no_new_upward_import():
    new = upward_imports() - KNOWN_UPWARD
    assert not new, "imports against the layering (DESIGN.md section 2): " + "; ".join(
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in sorted(new))


def test_known_upward_imports_still_exist():
    gone = KNOWN_UPWARD - upward_imports()
    assert not gone, f"fixed, well done: remove {sorted(gone)} from KNOWN_UPWARD in tests/test_layering.py"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The checker itself: a relative, function-local import is resolved to the module it names."""
    source = PACKAGE / "fast" / "plan.py"
    assert "def _fast_plan" in source.read_text()  # its `from .lora_linear import ...` is function-local
    assert "velotune.fast.lora_linear" in imported_modules(source)
    assert layer_of("velotune.models.decoder") > layer_of("velotune.fast.plan")
