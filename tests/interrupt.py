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


# ---------------------------------------------------------------- a real process killed mid-save

# The moments a crash hurts most, each a function of the training process to wrap: the process
# kills itself with SIGKILL (no clean-up, no finally blocks, as a power cut or `kill -9`) right
# after the wrapped call returns during the given epoch.
KILL_MOMENTS = {
    # model.safetensors of the new checkpoint was written; its temporary folder is still there
    "weights_written": "vision_ft.checkpoint:save_file",
    # the old checkpoints/ was renamed aside, the new one not yet renamed in
    "between_renames": "vision_ft.checkpoint:os.replace",
    # the new checkpoint is switched in, its metrics line not yet written
    "checkpoint_switched": "vision_ft.checkpoint:_switch_in",
    # the metrics line of the epoch was written
    "metrics_line_written": "vision_ft.train:append_metrics_line",
}

_DRIVER = r'''
import importlib, json, os, signal, sys
moment, target, epoch, argv = json.loads(sys.argv[1])
module_name, attribute = target.split(":")
owner = importlib.import_module(module_name)
if attribute == "os.replace":
    owner, attribute = owner.os, "replace"
real = getattr(owner, attribute)
train_module = importlib.import_module("vision_ft.train")  # the module, not vision_ft.train the function
current = {"epoch": 0}
real_epoch = train_module._train_one_epoch
def counting_epoch(*args, **kwargs):
    current["epoch"] = kwargs.get("epoch", args[-1])
    return real_epoch(*args, **kwargs)
train_module._train_one_epoch = counting_epoch
def wrapped(*args, **kwargs):
    result = real(*args, **kwargs)
    first = str(args[0]) if args else ""
    second = str(args[1]) if len(args) > 1 else ""
    hit = current["epoch"] == epoch and (
        moment not in ("weights_written", "between_renames")
        or (moment == "weights_written" and second.endswith("model.safetensors") and ".checkpoints.tmp-" in second)
        or (moment == "between_renames" and second.endswith(".checkpoints.previous")))
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, attribute, wrapped)
from vision_ft.cli import main
sys.exit(main(argv))
'''


def train_and_kill(argv: list[str], moment: str, epoch: int, timeout: float = 300) -> tuple[int, str]:
    """Run `vision-ft <argv>` in a new process that SIGKILLs itself at `moment` of `epoch`;
    (its exit code, the end of its stderr)."""
    import json
    import subprocess
    import sys

    payload = json.dumps([moment, KILL_MOMENTS[moment], epoch, argv])
    done = subprocess.run([sys.executable, "-c", _DRIVER, payload], timeout=timeout, capture_output=True, text=True)
    return done.returncode, done.stderr[-2000:]
