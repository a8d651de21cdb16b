"""Every environment switch velotune reads, parsed in one place and one way.

Why one module: the switches used to be read where they were used, each with its own idea of
"true" (HF_HUB_OFFLINE was parsed two different ways), and a typo such as
`VELOTUNE_DISABLE_KERNELS=ture` silently meant "off". Here every switch is a field of one frozen
`Settings`; `current()` returns it. A boolean accepts 1/true/yes/on and 0/false/no/off (any case,
surrounding spaces ignored; empty or unset is the default); anything else is a ValueError that names
the variable and the allowed values.

The environment is read again whenever one of these variables changed since the last call (a few
dictionary look-ups), so setting a variable mid-session, or `monkeypatch.setenv` in a test, takes
effect at the next `current()`; the parsing itself happens only on a change.

This module sits at the bottom of the package (tests/test_layering.py): it imports nothing from
velotune. `TRITON_INTERPRET` is not here: it is Triton's own switch and `kernels/_triton.py` asks
Triton for it, so velotune and Triton never disagree about it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """The parsed switches; each field's metadata is its variable, default and meaning (README table)."""

    disable_kernels: bool = False
    return_logits: bool = False
    cuda_graphs: bool = True
    triton_fast_launch: bool = True
    cache_dir: Path = Path.home() / ".cache" / "velotune"
    hub_offline: bool = False
    require_fp8: bool = False
    host_embedding: bool = True


# field -> (variables read, first set one wins; what it does). The order is the README table's.
SWITCHES = {
    "disable_kernels": (("VELOTUNE_DISABLE_KERNELS",),
                        "1 forces the exact plain PyTorch path: no Triton kernels, no fused LoRA"),
    "return_logits": (("VELOTUNE_RETURN_LOGITS",),
                      "1 makes the fast path return logits beside the fused loss (it builds none otherwise)"),
    "cuda_graphs": (("VELOTUNE_CUDA_GRAPHS",),
                    "0 turns off the CUDA graphs of offloaded checkpointed layers"),
    "triton_fast_launch": (("VELOTUNE_TRITON_FAST_LAUNCH",),
                           "0 sends every kernel launch through Triton's own launcher"),
    "cache_dir": (("VELOTUNE_CACHE",),
                  "velotune's cache folder (the bundled fixture model converted once, under fixtures/)"),
    "hub_offline": (("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                    "1: no Hugging Face hub look-ups or uploads (huggingface_hub reads the same variables)"),
    "require_fp8": (("VELOTUNE_REQUIRE_FP8",),
                    "1: FP8 compute that was asked for (load_in_fp8, fp8_compute) and cannot run is an error, "
                    "not a notice and the 16-bit path"),
    "host_embedding": (("VELOTUNE_HOST_EMBEDDING",),
                       "0 keeps a frozen, untied input embedding on the GPU while training (it waits in pinned host "
                       "memory otherwise)"),
}
VARIABLES = tuple(name for names, _ in SWITCHES.values() for name in names)

_cache: tuple[tuple[str | None, ...], Settings] | None = None


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    """`value` of environment variable `name` as a boolean; unset or empty gives `default`."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise ValueError(f"{name}={value!r}: allowed values are 1/true/yes/on and 0/false/no/off "
                     "(empty or unset for the default)")


def parse(environ) -> Settings:
    """The settings `environ` (a mapping like os.environ) describes; the one parser."""
    defaults = Settings()
    values = {}
    for field in fields(Settings):
        names, _ = SWITCHES[field.name]
        name = next((n for n in names if (environ.get(n) or "").strip()), names[0])
        raw, default = environ.get(name), getattr(defaults, field.name)
        if isinstance(default, bool):
            values[field.name] = parse_bool(name, raw, default)
        else:  # a folder
            values[field.name] = Path(raw.strip()).expanduser() if raw and raw.strip() else default
    return Settings(**values)


def current() -> Settings:
    """The settings of the environment as it is now (parsed again only when a variable changed)."""
    global _cache
    key = tuple(map(os.environ.get, VARIABLES))
    cached = _cache
    if cached is not None and cached[0] == key:
        return cached[1]
    settings = parse(os.environ)
    _cache = (key, settings)
    return settings


def describe() -> list[tuple[str, str, str, str]]:
    """(variables, values, default, what it does) per switch: the README's table, checked by a test."""
    defaults = Settings()
    rows = []
    for field in fields(Settings):
        names, what = SWITCHES[field.name]
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            values, shown = "1/true/yes/on, 0/false/no/off", "1" if default else "0"
        else:
            values, shown = "a folder", "~/.cache/velotune"
        rows.append((" or ".join(f"`{name}`" for name in names), values, shown, what))
    return rows
