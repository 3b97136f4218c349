"""The run folder: one place holding everything a run produced, safe against overwrites.

A folder is only ever replaced with `--force`, and only when it carries our marker file, so a
mistyped `--out` can never delete a user's own data. One process at a time trains, resumes or
replaces a run folder: `RunLock` holds an exclusive lock on it (see `vision_ft.run_lock`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vision_ft.errors import VisionFTError
from vision_ft.run_lock import LOCK_FILE, RunLock

MARKER = ".vision-ft-run"
CHECKPOINTS = "checkpoints"
# Where the previous checkpoints/ waits while a new one is switched in (see vision_ft.checkpoint).
PREVIOUS = ".checkpoints.previous"


def checkpoint_folder(checkpoints: Path, which: str) -> Path:
    """`checkpoints/<which>`, or its copy in PREVIOUS while a save is between its two renames."""
    folder = checkpoints / which
    if not folder.exists() and not checkpoints.exists():
        previous = checkpoints.parent / PREVIOUS / which
        if previous.is_dir():
            return previous
    return folder


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def best(self) -> Path:
        return checkpoint_folder(self.checkpoints, "best")

    @property
    def last(self) -> Path:
        return checkpoint_folder(self.checkpoints, "last")

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def log_file(self) -> Path:
        return self.root / "train.log"

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def next_run_path(base: Path, model_name: str, data_path: Path) -> Path:
    """`runs/<data>-<model>-<n>` with the first n that is free, so runs never collide."""
    stem = f"{_slug(data_path.stem if data_path.suffix == '.csv' else data_path.name)}-{_slug(model_name)}"
    n = 1
    while (base / f"{stem}-{n}").exists():
        n += 1
    return base / f"{stem}-{n}"


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise VisionFTError(
            f"--out {path} is a symbolic link (to {path.resolve()}); --force replaces only a real folder: "
            "pass the folder itself, or another --out"
        )


def create_run_folder(path: Path, force: bool = False, lock: RunLock | None = None) -> RunFolder:
    """Make a new run folder at `path`; an existing one needs `force` and must be a run of ours.

    The folder is locked while it is checked and emptied, so a folder another process is training
    is never replaced. Pass `lock` (a `RunLock(path)`) to keep holding it afterwards; the caller
    then releases it.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or _has_content(path)):
        _check_replaceable(path, force)
    own_lock = lock is None
    lock = lock or RunLock(path)
    lock.acquire()
    try:
        if _has_content(path):  # checked again under the lock: another process may have started here
            _check_replaceable(path, force)
            for entry in path.iterdir():
                if entry.name != LOCK_FILE:  # deleting our own lock file would let a third process in
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (path / MARKER).write_text("This folder was written by vision-ft train.\n")
    finally:
        if own_lock:
            lock.release()
    return RunFolder(path)


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(entry.name != LOCK_FILE for entry in path.iterdir())


def _check_replaceable(path: Path, force: bool) -> None:
    if not force:
        raise VisionFTError(
            f"run folder {path} already exists; pass --resume to continue it, --force to replace it, "
            "or choose another --out"
        )
    _refuse_symlink(path)
    if not (path / MARKER).is_file():
        raise VisionFTError(
            f"{path} exists and is not a vision-ft run folder; refusing to replace it even with --force, "
            "choose another --out"
        )


def open_run_folder(path: Path) -> RunFolder:
    """An existing run folder, checked to be one."""
    run = RunFolder(Path(path))
    if not run.root.is_dir():
        raise VisionFTError(f"run folder {path} does not exist; pass the folder that `vision-ft train` printed")
    if not run.config.is_file():
        raise VisionFTError(f"{path} is not a vision-ft run folder (no config.yaml); pass the folder `vision-ft train` printed")
    return run
