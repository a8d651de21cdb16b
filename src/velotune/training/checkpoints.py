"""Atomic checkpoint folders and Ctrl-C that stops at a step boundary with a checkpoint.

Atomic: transformers writes `checkpoint-N` file by file, and resuming picks the newest folder by
name, so a crash mid-save would leave a folder that looks complete but is not. velotune's trainer
writes into `output_dir/.partial/checkpoint-N` and renames it into place only when every file
is written (a rename within one file system is atomic), so `checkpoint-N` is always whole.

Ctrl-C: the first SIGINT only sets a flag; at the end of the current optimizer step the run saves
a checkpoint and stops, then `train()` raises KeyboardInterrupt. A checkpoint taken between
steps holds consistent weights, optimizer, scheduler and data position, so
`train(resume_from_checkpoint=True)` continues exactly. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

STAGING = ".partial"


def publish(staged: Path, final: Path) -> None:
    """Move a finished checkpoint folder into place; an older folder of the same name goes only after."""
    old = final.with_name(final.name + ".replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


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
        print("\nvelotune: Ctrl-C: saving a checkpoint at the end of this step, then stopping "
              "(press Ctrl-C again to stop without saving)", flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
