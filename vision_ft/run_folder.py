"""The run folder: one place holding everything a run produced, safe against overwrites.

A folder is only ever replaced with `--force`, and only when it carries our marker file, so a
mistyped `--out` can never delete a user's own data.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vision_ft.errors import VisionFTError

MARKER = ".vision-ft-run"


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
    def best(self) -> Path:
        return self.root / "checkpoints" / "best"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last"

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


def create_run_folder(path: Path, force: bool = False) -> RunFolder:
    """Make a new run folder at `path`; an existing one needs `force` and must be a run of ours."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            raise VisionFTError(
                f"run folder {path} already exists; pass --resume to continue it, --force to replace it, "
                "or choose another --out"
            )
        if not (path / MARKER).is_file():
            raise VisionFTError(
                f"{path} exists and is not a vision-ft run folder; refusing to replace it even with --force, "
                "choose another --out"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("This folder was written by vision-ft train.\n")
    return RunFolder(path)


def open_run_folder(path: Path) -> RunFolder:
    """An existing run folder, checked to be one."""
    run = RunFolder(Path(path))
    if not run.root.is_dir():
        raise VisionFTError(f"run folder {path} does not exist; pass the folder that `vision-ft train` printed")
    if not run.config.is_file():
        raise VisionFTError(f"{path} is not a vision-ft run folder (no config.yaml); pass the folder `vision-ft train` printed")
    return run
