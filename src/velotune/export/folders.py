"""Output folders: never clobber what the user had, never leave half a file under its final name.

A folder velotune exported into carries `velotune_export.json`; exporting there again is
allowed (the files it lists are replaced). Any other non-empty folder is refused unless the
caller passes `overwrite=True`. Every file is written as `<name>.partial` and renamed when
complete, so a crash or a full disk never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = "velotune_export.json"


def prepare_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Create `folder` or check that velotune may write into it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file, not a folder; choose another save_directory")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file() and not overwrite:
        raise FileExistsError(
            f"{folder} is not empty and was not written by a velotune export; refusing to write into it so "
            "nothing there is lost. Choose an empty or new folder, or pass overwrite=True to write anyway."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse before writing anything when the disk cannot hold the export (+2% headroom)."""
    free = shutil.disk_usage(folder).free
    if needed_bytes * 1.02 > free:
        raise OSError(f"not enough disk space for {what} in {folder}: needs about {human_size(needed_bytes)}, "
                      f"{human_size(free)} free. Free some space or choose another save_directory.")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `<path>.partial` to write; rename onto `path` only when the block succeeds."""
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_marker(folder: Path, kind: str, files: list[str], **details) -> None:
    record = {"kind": kind, "files": sorted(files), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **details}
    previous = folder / MARKER
    if previous.is_file():  # keep the record of earlier exports into the same folder
        try:
            old = json.loads(previous.read_text())
            record["files"] = sorted(set(record["files"]) | set(old.get("files", [])))
        except (ValueError, OSError):
            pass
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', 2**30 -> bytes (decimal units, as transformers reads max_shard_size)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string like '5GB' or '500MB'")
