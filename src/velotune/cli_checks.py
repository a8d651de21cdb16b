"""Checks the `velotune` command runs on a config before it loads any model.

Why a module of its own: a user's mistake in a config (a YAML typo, a string where a number goes,
an unknown quantization, a data file that cannot be read) should cost one clear line and exit
code 2 within a second, not a model load followed by a traceback from deep inside a library.

YAML: PyYAML implements YAML 1.1, where `2e-4` (no dot) is a string; people write learning rates
that way, and YAML 1.2 reads it as a number, so the loader here resolves floats as YAML 1.2 does.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

PRIMITIVES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple),
              "dict": (dict,), "None": (type(None),)}
_IGNORED_WORDS = {"Optional", "Union", "typing", "Literal"}


class ConfigError(ValueError):
    """A config key or value the command cannot use; the message names the allowed ones."""


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads `2e-4`, `1E5` and `.5` as floats (YAML 1.2)."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                    |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def read_yaml(path):
    """The YAML file's contents; a syntax error becomes a ConfigError naming the line and column."""
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}") from None


def _accepted(annotation) -> tuple[type, ...] | None:
    """Python types a value of this annotation may have, or None when it cannot be checked simply."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9.]*", text.replace("NoneType", "None")))
    words -= _IGNORED_WORDS
    if not words or any(w not in PRIMITIVES for w in words):
        return None
    accepted = tuple(t for w in words for t in PRIMITIVES[w])
    if "Optional" in text:
        accepted += (type(None),)
    return accepted


def _fits(value, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in accepted:
        return False  # True is an int to Python, not to a user
    return isinstance(value, accepted)


def _check(where: str, key: str, value, annotation, default) -> None:
    # Only annotated arguments are checked: an unannotated default (use_gradient_checkpointing=True) may
    # stand for several types ("unsloth").
    accepted = _accepted(annotation) if annotation is not inspect.Parameter.empty else None
    if accepted is not None and default is None:
        accepted += (type(None),)
    if accepted is None or _fits(value, accepted):
        return
    names = sorted({t.__name__.replace("NoneType", "null") for t in accepted})
    raise ConfigError(f"{where}.{key}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}")


def check_types(config: dict, path) -> None:
    """Every value of the model, lora and training sections has a type its argument takes."""
    from . import FastLanguageModel, TrainingArguments

    for section, function in (("model", FastLanguageModel.from_pretrained),
                              ("lora", FastLanguageModel.get_peft_model)):
        parameters = inspect.signature(function).parameters
        for key, value in (config.get(section) or {}).items():
            if key in parameters:
                parameter = parameters[key]
                _check(f"{path}: {section}", key, value, parameter.annotation, parameter.default)
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for key, value in (config.get("training") or {}).items():
        if key in fields:
            f = fields[key]
            if isinstance(value, bool) and f.metadata.get("const") is True:
                continue  # a flag that also takes a value (transformers' fsdp: True or "full_shard")
            default = f.default if f.default is not dataclasses.MISSING else None
            _check(f"{path}: training", key, value, f.type, default)


def check_export(export: dict, path) -> None:
    """Quantization methods and merged save methods exist (before hours of training, not after)."""
    from .quant.gguf.methods import ALLOWED_QUANTS, normalize_method

    methods = export.get("gguf") or []
    for method in [methods] if isinstance(methods, str) else methods:
        try:
            normalize_method(method)
        except ValueError:
            raise ConfigError(f"{path}: export.gguf: unknown quantization {method!r}; use one of "
                              f"{', '.join(sorted(ALLOWED_QUANTS))}") from None
    merged = export.get("merged")
    if merged:
        from .export import SAVE_METHODS

        if merged not in SAVE_METHODS:
            raise ConfigError(f"{path}: export.merged: unknown save method {merged!r}; use one of "
                              f"{', '.join(SAVE_METHODS)}")


def check_data(data: dict) -> None:
    """A configured data file exists, is readable and holds valid rows (DataFormatError names file and row)."""
    if data.get("path"):
        from .data.loading import load_local_dataset

        load_local_dataset(data["path"], data.get("format"))


def one_line(exc: BaseException) -> str:
    """An error's message on one line (a terminal shows it whole; --debug shows the traceback)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
