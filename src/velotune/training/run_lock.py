"""One training run per output folder: a lock file that names its holder and never stays stuck.

Why: two runs writing into one `output_dir` interleave their checkpoints (one run's adapter beside
the other's trainer state) and their rotation deletes each other's folders. The second run must
fail at once, naming the folder and the process holding it.

The lock is `output_dir/.velotune.lock`, created with O_CREAT|O_EXCL (atomic on local file
systems) and holding JSON {pid, host, start, run}. A lock whose process is gone (a crashed or
killed run) is stale and is taken over with a notice: on the same host the pid is checked for life
and, where /proc exists, for its start time too (so a recycled pid, common in containers, does not
keep a dead run's lock alive); zombies count as dead. A lock written by another host cannot be
checked and is refused with the fix (delete the file once that run is known to be gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

logger = logging.getLogger("velotune")

LOCK_NAME = ".velotune.lock"
# A lock file that is empty or unreadable was caught between its creation and its first write;
# after this many seconds its writer is taken to be dead.
TORN_LOCK_SECONDS = 10.0


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output folder's lock."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces or parentheses
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return False  # a zombie: the run has exited, its parent has not reaped it yet
    except (OSError, ValueError, IndexError):
        pass
    current = _proc_start(pid)
    return start is None or current is None or current == start


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (run {holder.get('run')}, since {holder.get('since')})"


def read_holder(folder: Path) -> dict | None:
    """The lock's contents, {} for a torn (empty/partial) file, or None when there is no lock."""
    try:
        text = (folder / LOCK_NAME).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def holder_is_live(folder: Path, holder: dict) -> bool:
    if not holder:  # torn: live only while it is young
        try:
            age = time.time() - (folder / LOCK_NAME).stat().st_mtime
        except FileNotFoundError:
            return False
        return age < TORN_LOCK_SECONDS
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    return _alive(int(holder.get("pid", -1)), holder.get("start"))


def _in_use_error(folder: Path, holder: dict) -> OutputDirInUseError:
    if holder and holder.get("host") != socket.gethostname():
        fix = (f"if that run is gone, delete {folder / LOCK_NAME}; or train into another output_dir")
    else:
        fix = "wait for it to finish, stop it, or train into another output_dir"
    who = describe(holder) if holder else "a process that is still writing the lock file"
    return OutputDirInUseError(f"output_dir {folder} is in use by another training run: {who} holds "
                               f"{folder / LOCK_NAME}; nothing was trained. {fix}")


def check_free(folder) -> None:
    """Raise OutputDirInUseError when a live run holds `folder`'s lock (does not take it)."""
    folder = Path(folder)
    holder = read_holder(folder)
    if holder is not None and holder_is_live(folder, holder):
        raise _in_use_error(folder, holder)


class RunLock:
    """The lock of one run on one folder; `acquire()` takes it (replacing a stale one), `release()` frees it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.held = False

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> None:
        if self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
                  "run": self.run_id, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.folder)
                if holder is None:
                    continue  # released between our two looks
                if holder_is_live(self.folder, holder):
                    raise _in_use_error(self.folder, holder) from None
                logger.warning("velotune: %s: taking over the lock of a run that is gone (%s)", self.folder,
                               describe(holder) if holder else "an empty lock file")
                self._remove_if_same(holder)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return
        raise _in_use_error(self.folder, read_holder(self.folder) or {})

    def _remove_if_same(self, holder: dict) -> None:
        """Remove the stale lock unless another run replaced it in the meantime."""
        if read_holder(self.folder) == holder:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.folder)
        if holder and holder.get("run") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
