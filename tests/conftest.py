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
