"""Atomic checkpoint folders and Ctrl-C that stops at a step boundary with a checkpoint.

Atomic: transformers writes `checkpoint-N` file by file, and resuming picks the newest folder by
name, so a crash mid-save would leave a folder that looks complete but is not. velotune's trainer
writes into `output_dir/.partial/checkpoint-N` and renames it into place only when every file
is written (a rename within one file system is atomic), so `checkpoint-N` is always whole.

Staging is per run (`.partial/<run id>/`), so two runs never share a half-written folder, and
each published checkpoint carries `velotune_checkpoint.json`: rotation (`save_total_limit`)
deletes only folders named `checkpoint-<number>` holding that marker, never a user's
`checkpoint-notes/` or a checkpoint velotune did not write.

Ctrl-C: the first SIGINT only sets a flag; at the end of the current optimizer step the run saves
a checkpoint and stops, then `train()` raises KeyboardInterrupt. A checkpoint taken between
steps holds consistent weights, optimizer, scheduler and data position, so
`train(resume_from_checkpoint=True)` continues exactly. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("velotune")

STAGING = ".partial"
MARKER = "velotune_checkpoint.json"
NUMBERED = re.compile(r"checkpoint-(\d+)")


def write_marker(folder: Path, run_id: str, step: int) -> None:
    """Sign a staged checkpoint as velotune's (before it is published, so it is atomic with it)."""
    (folder / MARKER).write_text(json.dumps({"written_by": "velotune", "run": run_id, "step": step}))


def ours(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints velotune wrote in `folder`, oldest step first."""
    found = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = NUMBERED.fullmatch(path.name)
        if match and path.is_dir() and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def rotate(folder: Path, limit, best: str | None) -> list[Path]:
    """Delete velotune's oldest numbered checkpoints beyond `limit` (the best one is kept, as in
    transformers); returns the deleted folders. Nothing else in `folder` is looked at."""
    if not limit or limit <= 0:
        return []
    # Oldest written first (the marker's time, then the step): a run resumed from an older checkpoint
    # must not delete what it just wrote because an abandoned run's folder has a larger number.
    checkpoints = [path for _, path in sorted(ours(folder), key=lambda sp: ((sp[1] / MARKER).stat().st_mtime, sp[0]))]
    best_path = Path(best).resolve() if best else None
    best_one = [p for p in checkpoints if best_path is not None and p.resolve() == best_path]
    keep = set(checkpoints[-limit:])
    if best_one and best_one[0] not in keep:  # the newest always stays (to resume), so limit=1 keeps two
        keep = set(best_one) | set(checkpoints[-max(limit - 1, 1):])
    deleted = [p for p in checkpoints if p not in keep]
    for path in deleted:
        logger.info("velotune: save_total_limit=%s: deleting older checkpoint %s", limit, path)
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def clear_stale_staging(folder: Path, keep: str) -> None:
    """Remove other runs' staging folders; called only while this run holds the folder's lock,
    so every other run that staged here has ended (it crashed mid-save)."""
    staging = Path(folder) / STAGING
    if not staging.is_dir():
        return
    for entry in staging.iterdir():
        if entry.name != keep:
            logger.info("velotune: removing %s, left by a run that stopped while saving", entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty


class ForeignCheckpointError(FileExistsError):
    """A checkpoint velotune is about to publish would replace a folder velotune did not write."""


def publish(staged: Path, final: Path) -> None:
    """Move a finished checkpoint folder into place; an older folder of the same name goes only
    after, and only when velotune wrote it (else the new checkpoint stays staged and this raises)."""
    if final.exists() and not (final / MARKER).is_file():
        raise ForeignCheckpointError(
            f"{final} exists and was not written by velotune, so it is not replaced; this step's checkpoint is "
            f"kept in {staged}. Move {final} away (or train into another output_dir) and resume")
    old = final.with_name(final.name + ".replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def save_failed(error: BaseException, folder: Path, before: dict, what: str, last: str | None,
                note: str = "", weights: tuple[str, ...] = ()) -> OSError | None:
    """An OSError naming the file being written and the last good checkpoint when a save (`what`) into
    `folder` ran out of disk space or hit the file-size limit; None for any other error. Training
    stops, but nothing already on disk was touched: the last good checkpoint resumes the run."""
    from ..export.folders import save_failure

    if last:
        then = (f"{what} was not saved{note}; the last good checkpoint is {last}. Make room (or raise the limit), "
                "then resume with trainer.train(resume_from_checkpoint=True)")
    else:
        then = f"{what} was not saved{note}; no checkpoint was saved before it"
    return save_failure(folder, before, error, then, fix_limit="save less per checkpoint (save_only_model=True "
                        "skips the optimizer state, but such checkpoints cannot resume)", where="output_dir",
                        weights=weights)


def fsync_tree(folder: Path) -> None:
    """Flush the checkpoint's files to disk before the rename makes them visible."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


class InterruptCallback(TrainerCallback):
    """Turns a pending Ctrl-C into "save now and stop" at the next step end."""

    def __init__(self):
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def ctrl_c_saves(callback: InterruptCallback):
    """While training: the first SIGINT sets callback.requested; a second one raises at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if callback.requested:
            raise KeyboardInterrupt
        callback.requested = True
        logger.warning("velotune: Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                       "(press Ctrl-C again to stop without saving)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
