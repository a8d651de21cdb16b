"""Output folders: never clobber what the user had, never leave half a file under its final name,
never leave an earlier export's files beside a new one.

A folder velotune exported into carries `velotune_export.json` (the marker), which lists every
file velotune wrote there, per group: "weights" (a merged or adapter folder: a new one replaces
the previous one whole, so no old shard or index can shadow the new weights) and "gguf" (one
file per method, so `q4_k_m`, then `q8_0`, then `f16` into one folder keep all three, as the
docs show). Files velotune did not write are never deleted. Any other non-empty folder is
refused unless the caller passes `overwrite=True`.

Every file is written as `<name>.partial` and renamed when complete; the marker names the files
being written before the first byte, so after a crash the next export into the folder knows the
leftover `*.partial` files are its own and removes them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("velotune")

MARKER = "velotune_export.json"
PARTIAL = ".partial"
# what velotune's exporters name their files: a folder holding only partials of these is a crashed export
_OUR_NAMES = ("model", "pytorch_model", "adapter_", "config.json", "generation_config.json", "tokenizer",
              "special_tokens_map.json", "chat_template", "Modelfile", "vocab.json", "merges.txt")


def group_of(kind: str) -> str:
    """Exports of one group replace each other; "gguf" files are per method and accumulate."""
    return "gguf" if kind == "gguf" else "weights"


def read_marker(folder: Path) -> dict:
    """The marker as {"files": [...], "groups": {group: {"kind", "files", ...}}, "writing": [...]}
    (older markers, one export's {"kind", "files"}, are read into that form)."""
    try:
        old = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {"files": [], "groups": {}, "writing": []}
    groups = old.get("groups")
    if not isinstance(groups, dict):
        kind = old.get("kind", "merged_16bit")
        groups = {group_of(kind): {"kind": kind, "files": list(old.get("files", []))}}
    files = set(old.get("files", []))
    for group in groups.values():
        files |= set(group.get("files", []))
    return {"files": sorted(files), "groups": groups, "writing": list(old.get("writing", []))}


def _write_json(path: Path, record: dict) -> None:
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def _only_our_partials(folder: Path) -> list[Path]:
    """The entries of `folder` when every one is a `*.partial` file velotune names that way."""
    entries = list(folder.iterdir())
    ours = [p for p in entries if p.is_file() and p.name.endswith(PARTIAL) and p.name.startswith(_OUR_NAMES)]
    return ours if len(ours) == len(entries) else []


def prepare_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Create `folder` or check that velotune may write into it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file, not a folder; choose another save_directory")
    if folder.is_dir() and not (folder / MARKER).is_file():
        leftovers = _only_our_partials(folder)
        for p in leftovers:  # a crashed export (before markers were written first): our own half-files
            logger.warning("velotune: removing %s, left by an export that did not finish", p)
            p.unlink()
        if any(folder.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{folder} is not empty and was not written by a velotune export; refusing to write into it so "
                "nothing there is lost. Choose an empty or new folder, or pass overwrite=True to write anyway.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class ExportRecord:
    """One export into a folder: `begin` before the first file, `finish` after the last.

    `begin` writes the marker with the files about to be written (so a crash leaves a folder the
    next export recognises, and removes their `*.partial` leftovers); `finish` deletes the files
    of the previous export of the same group that this one did not rewrite, and records this one.
    """

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind, self.group = folder, kind, group_of(kind)
        self.previous = read_marker(folder)

    def begin(self, planned: list[str]) -> None:
        for name in set(self.previous["files"]) | set(self.previous["writing"]) | set(planned):
            partial = self.folder / (name + PARTIAL)
            if partial.is_file():
                logger.warning("velotune: removing %s, left by an export that did not finish", partial)
                partial.unlink()
        record = dict(self.previous, writing=sorted(set(self.previous["writing"]) | set(planned)))
        _write_json(self.folder / MARKER, record)

    def abort(self) -> None:
        """A failed export (its partial files already removed): put the previous marker back, or
        remove ours when there was none, so a failed first export leaves the folder as it was."""
        marker = self.folder / MARKER
        if self.previous["files"] or self.previous["groups"]:
            _write_json(marker, dict(self.previous))
        elif marker.is_file():
            marker.unlink()

    def finish(self, written: list[str], **details) -> list[str]:
        """Record the export; returns the stale files it removed."""
        old_group = self.previous["groups"].get(self.group, {})
        old_files = set(old_group.get("files", []))
        removed = []
        if self.group == "weights":  # also what a failed export of ours left under its final names
            for name in sorted((old_files | set(self.previous["writing"])) - set(written)):
                path = self.folder / name
                if name != MARKER and not name.endswith(".gguf") and not name.startswith("Modelfile") \
                        and path.parent == self.folder and path.is_file():
                    path.unlink()
                    removed.append(name)
            files = set(written)
        else:  # gguf: one file per method; keep the other methods' files that are still there
            files = set(written) | {n for n in old_files if (self.folder / n).is_file()}
        if removed:
            logger.info("velotune: removed the previous export's files that this one replaces: %s", removed)
        groups = dict(self.previous["groups"])
        groups[self.group] = {"kind": self.kind, "files": sorted(files), **details}
        every = set()
        for group in groups.values():
            every |= set(group["files"])
        every |= set(self.previous["files"]) - set(removed) - old_files
        _write_json(self.folder / MARKER, {
            "kind": self.kind, "files": sorted(n for n in every if (self.folder / n).exists()),
            "groups": groups, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return removed


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse before writing anything when the disk cannot hold the export (+2% headroom)."""
    free = shutil.disk_usage(folder).free
    if needed_bytes * 1.02 > free:
        raise OSError(f"not enough disk space for {what} in {folder}: needs about {human_size(needed_bytes)}, "
                      f"{human_size(free)} free. Free some space or choose another save_directory.")


def no_room(path: Path, size: int, error: BaseException, fix_limit: str = "pass a smaller max_shard_size",
            where: str = "save_directory") -> tuple[int, str] | None:
    """(errno, why) when writing `path` (`size` bytes so far) failed for lack of room (full disk, quota,
    or the process's file-size limit), else None. Writers report these differently (OSError errno
    28/27, safetensors' "FileTooLarge", torch's "file write failed" or "unexpected pos"), so the
    cause is read off the system."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    code = getattr(error, "errno", None)
    text = str(error)
    if code == errno.EFBIG or "FileTooLarge" in text or "File too large" in text or \
            (limit != resource.RLIM_INFINITY and size >= limit - 4096):
        shown = human_size(limit) if limit != resource.RLIM_INFINITY else "the file system's maximum"
        return errno.EFBIG, f"the file reached the file-size limit ({shown}; see `ulimit -f`). Raise the limit or " \
                            f"{fix_limit}"
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "StorageFull" in text or \
            "Disk quota" in text or shutil.disk_usage(path.parent).free < 1 << 20:
        return errno.ENOSPC, f"the disk is full ({human_size(shutil.disk_usage(path.parent).free)} free). Free " \
                             f"some space or choose another {where}"
    return None


def write_failure(path: Path, partial: Path, error: BaseException) -> OSError | None:
    """An OSError naming `path` when writing it (as `partial`) failed for lack of room, else None."""
    size = partial.stat().st_size if partial.exists() else 0
    cause = no_room(path, size, error)
    if cause is None:
        return None
    return OSError(cause[0], f"writing {path} failed after {human_size(size)}: {cause[1]}. The half-written file "
                             "was removed; files already in the folder are unchanged")


def file_states(folder: Path) -> dict[Path, tuple[int, int]]:
    """{file: (mtime_ns, size)} under `folder`: taken before a save, so `failed_file` can tell what it wrote."""
    folder = Path(folder)
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else {}


def failed_file(folder: Path, before: dict[Path, tuple[int, int]], error: BaseException,
                weights: tuple[str, ...] = ()) -> Path | None:
    """The file a save into `folder` that failed was writing: a library (PEFT, transformers, torch)
    writes its files one by one straight under their names and does not say which one failed.
    A file at the file-size limit is it; safetensors deletes the file it failed to write, so after
    its error it is the first of `weights` (names, in `folder`) that was not written; otherwise the
    file written last (new or changed since `before`; on equal times the largest)."""
    folder = Path(folder)
    changed = [(state, path) for path, state in file_states(folder).items() if before.get(path) != state]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    at_limit = [item for item in changed if limit != resource.RLIM_INFINITY and item[0][1] >= limit - 4096]
    if not at_limit and "SafetensorError" in (type(error).__name__, type(error.__cause__).__name__):
        unwritten = [folder / n for n in weights if (folder / n) not in {path for _, path in changed}]
        if unwritten:
            return unwritten[0]
    return max(at_limit or changed, key=lambda item: item[0])[1] if changed else None


def save_failure(folder: Path, before: dict[Path, tuple[int, int]], error: BaseException, then: str,
                 fix_limit: str, where: str, weights: tuple[str, ...] = ()) -> OSError | None:
    """An OSError naming the file being written when a save by another library into `folder` ran out of
    room (else None); `then` says what became of the save and what to do; `weights`: the safetensors
    files the save writes (see failed_file)."""
    path = failed_file(folder, before, error, weights) or Path(folder)
    size = path.stat().st_size if path.is_file() else 0
    cause = no_room(path if path.is_file() else path / "x", size, error, fix_limit, where)
    if cause is None:
        return None
    return OSError(cause[0], f"writing {path} failed after {human_size(size)}: {cause[1]}. {then}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `<path>.partial` to write; rename onto `path` only when the block succeeds."""
    partial = path.with_name(path.name + PARTIAL)
    try:
        try:
            yield partial
        except Exception as error:
            named = write_failure(path, partial, error)
            if named is not None:
                raise named from error
            raise
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


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
