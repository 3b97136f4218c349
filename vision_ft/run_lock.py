"""An exclusive lock on a run folder, so one process at a time trains, resumes or replaces it.

The lock is an operating-system lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on the
file ``RUN/.vision-ft-lock``, which also records the holder's process id for the error message.
The operating system drops the lock when its process ends, however it ends (kill -9, power
loss of a network client aside), so a lock can never outlive its process: a file whose recorded
process is gone is a stale lock, taken over silently except for a log line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from vision_ft.errors import VisionFTError

LOCK_FILE = ".vision-ft-lock"

log = logging.getLogger("vision_ft")

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def read_holder(folder: Path) -> str:
    """What the lock file says about its holder ("process 1234 on host, since ..."), or ""."""
    try:
        return (Path(folder) / LOCK_FILE).read_text(errors="replace").strip()[:200]
    except OSError:
        return ""


class RunLock:
    """Exclusive lock on `folder` (created if missing); use as a context manager or acquire/release."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self.stale_holder = ""  # after acquire: the note of a process that died holding the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise VisionFTError naming the process that holds it."""
        if self._fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise VisionFTError(f"cannot create the lock file {path} ({exc.strerror}); check the folder's permissions") from None
        if not _try_lock(fd):
            os.close(fd)
            holder = read_holder(self.folder) or "another process"
            raise VisionFTError(
                f"run folder {self.folder} is in use by {holder}; wait for it to finish or stop it, "
                "then run this command again"
            )
        stale = os.read(fd, 200).decode(errors="replace").strip()
        self.stale_holder = stale
        if stale:
            # The OS released that process's lock when it ended; only its note is left.
            log.info("taking over the lock of %s, which is no longer running", stale)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        note = f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.write(fd, note.encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (the file stays, emptied, so no process ever locks a deleted file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the folder was deleted while locked (a failed new run): nothing left to tidy
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def tidy_if_idle(folder: Path, tidy: Callable[[], object]) -> None:
    """Run `tidy` under the lock when no process holds it (readers: eval, predict, export)."""
    if not Path(folder).is_dir():
        return
    lock = RunLock(folder)
    try:
        lock.acquire()
    except VisionFTError:
        return  # a training process owns the folder and tidies it itself
    try:
        tidy()
    finally:
        lock.release()
