"""Crash safety of a run folder: a real training process killed at the dangerous moments of a
save resumes to exactly the uninterrupted result; damaged checkpoints end in one line."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.interrupt import KILL_MOMENTS, train_and_kill
from tests.real_data import copy_neu_subset, needs_neu
from vision_ft.checkpoint import (MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, PREVIOUS, STATE_FILE, TEMP_PREFIX,
                                  reconcile_metrics_log, recover_checkpoints, save_checkpoints, verify_checkpoint,
                                  verify_resume_point)
from vision_ft.cli import main
from vision_ft.errors import VisionFTError

CLASSES = ("crazing", "inclusion", "scratches")
# test_resnet: timm's 0.4 M-parameter ResNet for tests; the save logic does not depend on size.
# The default augmentation list: resumed runs must repeat the augmentations bit for bit.
TINY = ["--model", "test_resnet", "--weights", "none", "--set", "data.image_size=32", "--set", "data.workers=0",
        "--set", "train.batch_size=8", "--set", "train.epochs=2", "--set", "export.onnx=false",
        "--set", "train.early_stopping.patience=10"]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / MODEL_FILE))


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((TEMP_PREFIX, PREVIOUS)))


@pytest.fixture(scope="module")
def tiny_neu(tmp_path_factory) -> Path:
    return copy_neu_subset(tmp_path_factory.mktemp("neu"), CLASSES, 8)


@pytest.fixture(scope="module")
def uninterrupted(tiny_neu, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["train", "--data", str(tiny_neu), "--out", str(out), *TINY]) == 0
    return out


# ---------------------------------------------------------------- a real process, killed


@pytest.mark.slow
@needs_neu
@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_killed_mid_save_resumes_to_the_uninterrupted_result(moment, tiny_neu, uninterrupted, tmp_path):
    run = tmp_path / "run"
    code, stderr = train_and_kill(["train", "--data", str(tiny_neu), "--out", str(run), *TINY], moment, epoch=2)
    assert code == -9, f"the training process was not killed at {moment} (exit {code}): {stderr}"

    # What the crash left: never a mix of epochs, at worst a leftover the next command removes.
    if moment == "weights_written":
        assert [p for p in _leftovers(run) if p.startswith(TEMP_PREFIX)], "the temporary folder should exist"
        assert verify_checkpoint(run / "checkpoints" / "last")["epoch"] == 1
    elif moment == "between_renames":
        assert not (run / "checkpoints").exists() and (run / PREVIOUS / "last").is_dir()
        # Readers fall back to the unit that is still complete.
        assert main(["eval", str(run), "--data", str(tiny_neu)]) == 0
    elif moment == "checkpoint_switched":
        assert verify_checkpoint(run / "checkpoints" / "last")["epoch"] == 2
        assert [r["epoch"] for r in _rows(run)] == [1]
    else:  # the last epoch's line: only the final evaluation (metrics.json, report) is missing
        assert [r["epoch"] for r in _rows(run)] == [1, 2] and not (run / "metrics.json").exists()

    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert _leftovers(run) == [] and (run / "report.md").is_file()
    assert [r["epoch"] for r in _rows(run)] == [1, 2], "each epoch logged exactly once"
    assert _rows(run) == _rows(uninterrupted)
    reference, resumed = _weights(uninterrupted), _weights(run)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert json.loads((run / "metrics.json").read_text())["test"] == \
        json.loads((uninterrupted / "metrics.json").read_text())["test"]


# ---------------------------------------------------------------- the checkpoint unit, without training


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _save_epochs(checkpoints: Path, epochs: int, improved_at: tuple[int, ...] = ()) -> nn.Module:
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    history = []
    for epoch in range(1, epochs + 1):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        history.append({"epoch": epoch, "train_loss": 1.0 / epoch})
        state = {"epoch": epoch, "best_epoch": max([e for e in improved_at if e <= epoch], default=0),
                 "history": list(history)}
        save_checkpoints(checkpoints, model, state, optimizer, improved=epoch in improved_at)
    return model


def test_each_save_is_a_complete_sealed_unit(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    model = _save_epochs(checkpoints, 3, improved_at=(1, 2))
    last, best = checkpoints / "last", checkpoints / "best"
    assert verify_checkpoint(last)["epoch"] == 3
    assert verify_checkpoint(best)["epoch"] == 2  # kept from epoch 2, not overwritten by epoch 3
    assert sorted(p.name for p in last.iterdir()) == [MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
    assert torch.equal(load_file(str(last / MODEL_FILE))["layer.weight"], model.layer.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"], "no temporary folder left"


@pytest.mark.parametrize("damage", ["truncate", "zero_bytes", "flip_a_byte", "delete"])
@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
def test_a_damaged_file_is_one_line_never_garbage(tmp_path, damage, name):
    checkpoints = tmp_path / "checkpoints"
    _save_epochs(checkpoints, 1, improved_at=(1,))
    path = checkpoints / "last" / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "zero_bytes":
        path.write_bytes(b"")
    elif damage == "flip_a_byte":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        path.unlink()
    with pytest.raises(VisionFTError) as error:
        verify_checkpoint(checkpoints / "last")
    message = str(error.value)
    assert "\n" not in message and str(checkpoints / "last") in message and name in message


def test_weights_and_state_of_different_epochs_are_refused(tmp_path):
    # The old failure: epoch-2 weights beside epoch-1 state, accepted by --resume.
    _save_epochs(tmp_path / "a", 1)
    _save_epochs(tmp_path / "b", 2)
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a" / "last", mixed)
    shutil.copy(tmp_path / "b" / "last" / MODEL_FILE, mixed / MODEL_FILE)
    with pytest.raises(VisionFTError, match="damaged"):
        verify_checkpoint(mixed)
    (mixed / MANIFEST_FILE).unlink()  # a folder of an older vision-ft: the weights' own epoch still tells
    with pytest.raises(VisionFTError, match=r"different epochs: state.json 1, model.safetensors 2"):
        verify_checkpoint(mixed)


def test_a_best_checkpoint_from_another_epoch_is_refused_on_resume(tmp_path):
    _save_epochs(tmp_path / "a", 1, improved_at=(1,))
    _save_epochs(tmp_path / "b", 2, improved_at=(1, 2))
    shutil.rmtree(tmp_path / "b" / "best")
    shutil.copytree(tmp_path / "a" / "last", tmp_path / "b" / "best")  # intact files, wrong epoch
    assert verify_resume_point(tmp_path / "a")["epoch"] == 1
    with pytest.raises(VisionFTError, match="holds epoch 1, the last checkpoint names epoch 2 as best"):
        verify_resume_point(tmp_path / "b")


def test_recovery_after_a_crash_between_the_two_renames(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _save_epochs(checkpoints, 2, improved_at=(1,))
    checkpoints.rename(tmp_path / PREVIOUS)
    (tmp_path / f"{TEMP_PREFIX}123-abc" / "last").mkdir(parents=True)
    done = recover_checkpoints(checkpoints)
    assert len(done) == 2 and verify_checkpoint(checkpoints / "last")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_metrics_log_is_reconciled_with_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    history = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    state = {"epoch": 2, "history": history}
    log.write_text(json.dumps(history[0]) + "\n")  # killed between the checkpoint and the log line
    assert "restored the line of epoch 2" in reconcile_metrics_log(log, state)
    assert [json.loads(line) for line in log.read_text().splitlines()] == history
    assert reconcile_metrics_log(log, state) is None

    log.write_text(json.dumps(history[0]) + "\n" + '{"epoch": 2, "tra')  # killed mid-line
    assert "torn" in reconcile_metrics_log(log, state)
    assert [json.loads(line) for line in log.read_text().splitlines()] == history

    log.write_text("".join(json.dumps(r) + "\n" for r in [*history, {"epoch": 3}]))
    with pytest.raises(VisionFTError, match="ends at epoch 3 but the last checkpoint is of epoch 2"):
        reconcile_metrics_log(log, state)


# ---------------------------------------------------------------- SIGTERM, a second process, damaged runs


_CLI = ["-c", "import sys; from vision_ft.cli import main; sys.exit(main(sys.argv[1:]))"]
# Two loader workers: each worker's augmentations must repeat after a resume. Runs with workers
# go through fresh processes, as a user's do: forking the test process, which has run threads of
# many libraries by then, can deadlock a worker.
WORKERS = [*TINY, "--set", "data.workers=2"]


def _vision_ft(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *_CLI, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@needs_neu
def test_sigterm_stops_workers_at_once_and_the_run_resumes_exactly(tiny_neu, tmp_path, capsys):
    psutil = pytest.importorskip("psutil")
    uninterrupted, run = tmp_path / "whole", tmp_path / "run"
    _vision_ft(["train", "--data", str(tiny_neu), "--out", str(uninterrupted), *WORKERS])
    process = subprocess.Popen([sys.executable, *_CLI, "train", "--data", str(tiny_neu), "--out", str(run), *WORKERS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 240
    first_checkpoint = run / "checkpoints" / "last" / MANIFEST_FILE
    # Stopped in epoch 2 (or its final evaluation), with the loader's workers up.
    while not first_checkpoint.exists() or len(parent.children(recursive=True)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    workers = parent.children(recursive=True)

    # Item 3 with a real trainer: a second process gets one line naming the holder.
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert f"in use by process {process.pid}" in capsys.readouterr().err

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert "continue a training run with --resume" in process.stderr.read()
    alive = []
    for worker in workers:
        try:
            if worker.status() != psutil.STATUS_ZOMBIE:
                alive.append(worker.pid)
        except psutil.NoSuchProcess:
            pass
    assert alive == [], "loader workers outlived the stopped training process"

    _vision_ft(["train", "--resume", "--out", str(run)])
    assert _rows(run) == _rows(uninterrupted)
    reference, resumed = _weights(uninterrupted), _weights(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.fixture
def copied_run(uninterrupted, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    return run


@pytest.mark.slow
@needs_neu
@pytest.mark.parametrize("damage", ["truncated model", "zero-byte optimizer", "garbage state"])
def test_damaged_checkpoints_end_every_command_in_one_line(copied_run, tiny_neu, tmp_path, capsys, damage):
    run = copied_run
    for which in ("best", "last"):
        folder = run / "checkpoints" / which
        if damage == "truncated model":
            data = (folder / MODEL_FILE).read_bytes()
            (folder / MODEL_FILE).write_bytes(data[: len(data) // 3])
        elif damage == "garbage state":
            (folder / STATE_FILE).write_text('{"epoch": 2, "hist')
        elif which == "last":
            (folder / OPTIMIZER_FILE).write_bytes(b"")
    commands = [["train", "--resume", "--set", "train.epochs=3", "--out", str(run)]]
    if damage != "zero-byte optimizer":  # the optimizer is only read to resume
        commands += [["eval", str(run), "--data", str(tiny_neu)], ["predict", str(run), str(tiny_neu / "crazing")],
                     ["export", str(run), "--out", str(tmp_path / "m.onnx")]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the training log, if any
        assert err.startswith("error: checkpoint ") and "is damaged" in err, (argv, err)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@needs_neu
def test_nan_weights_never_label_an_image(copied_run, tiny_neu, tmp_path, capsys):
    from vision_ft.checkpoint import save_checkpoint
    from vision_ft.run_model import load_run

    loaded = load_run(copied_run)
    state = verify_checkpoint(copied_run / "checkpoints" / "best")
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.fill_(float("nan"))
    save_checkpoint(copied_run / "checkpoints" / "best", loaded.model, state)  # intact files, NaN values

    capsys.readouterr()
    assert main(["eval", str(copied_run), "--data", str(tiny_neu)]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite outputs" in err and "\n" not in err
    for extra in ([], ["--threshold", "0.99"]):
        out = tmp_path / f"preds{len(extra)}.csv"
        assert main(["predict", str(copied_run), str(tiny_neu / "crazing"), "--out", str(out), *extra]) == 0
        rows = list(csv.DictReader(out.open()))
        assert rows and all(r["label"] == "error" and r["score"] == "" for r in rows)


@pytest.mark.slow
@needs_neu
def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder(tiny_neu, tmp_path, monkeypatch):
    from tests.interrupt import interrupt_at_epoch

    interrupt_at_epoch(monkeypatch, 1)
    assert main(["train", "--data", str(tiny_neu), "--out", str(tmp_path / "run"), *TINY]) == 130
    assert not (tmp_path / "run").exists()  # the same command runs again as it is


@pytest.mark.slow
@needs_neu
def test_a_diverging_run_leaves_nothing_that_blocks_the_corrected_command(tiny_neu, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(tiny_neu), "--out", str(run), *TINY, "--set", "train.lr=1.0e+38",
                 "--set", "train.warmup_epochs=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the training log
    assert err.startswith("error: the loss became"), err
    assert not run.exists()
    assert main(["train", "--data", str(tiny_neu), "--out", str(run), *TINY, "--set", "train.epochs=1"]) == 0
