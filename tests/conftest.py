"""Shared test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.real_data import NEU, RUN_ARGS, RUN_CLASSES, RUN_PER_CLASS, SHARED_DATA, copy_neu_subset


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (expected beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def neu_det(shared_data: Path) -> Path:
    """NEU surface-defect images: 6 class folders of 200x200 grayscale JPEGs."""
    if not NEU.is_dir():
        pytest.skip(f"{NEU} is absent")
    return NEU


@pytest.fixture(scope="session")
def neu_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_PER_CLASS images of each of RUN_CLASSES, copied from NEU-DET."""
    return copy_neu_subset(tmp_path_factory.mktemp("neu"), RUN_CLASSES, RUN_PER_CLASS)


@pytest.fixture(scope="session")
def trained_run(neu_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `vision-ft train` run folder on `neu_subset`. Shared by many tests: read it,
    or copy it before changing anything in it."""
    from vision_ft.cli import main

    out = tmp_path_factory.mktemp("runs") / "neu"
    assert main(["train", "--data", str(neu_subset), "--out", str(out), *RUN_ARGS]) == 0
    return out


@pytest.fixture
def torchrun(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `vision-ft ARGS...` in `nproc` CPU processes under torchrun (gloo); asserts it exits 0."""

    def run(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "vision_ft.cli", *args]
        # One thread per process: two processes share the two cores of a small CI machine.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run


@pytest.fixture(autouse=True)
def restore_vision_ft_logger():
    """Undo what a training run does to the "vision_ft" logger (its own handlers on streams the
    test closes, propagate off), so caplog works in whatever test runs next."""
    import logging

    logger = logging.getLogger("vision_ft")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = propagate, level
