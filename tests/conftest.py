"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_data import NEU, SHARED_DATA


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
