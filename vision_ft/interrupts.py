"""SIGTERM handled like Ctrl-C while training, so a stopped run cleans up as an interrupted one.

Schedulers, `timeout` and `docker stop` end a process with SIGTERM, whose default action skips
every `finally` block: DataLoader workers stay alive until they notice their parent is gone, and
the log never says how to continue. Raising KeyboardInterrupt instead runs the same clean-up as
Ctrl-C (workers stopped, lock released, "continue with --resume" printed). Checkpoints need no
such care: they are switched in atomically whatever kills the process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
