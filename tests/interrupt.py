"""Simulated Ctrl-C in the middle of a training run, for the resume tests."""

from __future__ import annotations

import importlib
from typing import Callable

import pytest

# `vision_ft.train` is the public function; the loop module is reached by its full name.
train_module = importlib.import_module("vision_ft.train")


def interrupt_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Callable[[], None]:
    """Make training raise KeyboardInterrupt when `epoch` starts; returns the undo."""
    real_epoch = train_module._train_one_epoch

    def crash(*args, **kwargs):
        if kwargs.get("epoch", args[-1]) == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_one_epoch", crash)
    return lambda: monkeypatch.setattr(train_module, "_train_one_epoch", real_epoch)
