"""The defaults end to end: auto settings resolved and recorded, a ViT at 64 px, a time budget,
the learning-rate range test, and one-line errors for bad values."""

import json
from pathlib import Path

import pytest
import yaml

from tests.real_data import copy_neu_subset
from vision_ft.cli import main

FAST = ["--set", "data.workers=0", "--set", "train.batch_size=8", "--weights", "none"]


@pytest.fixture
def imbalanced_neu(tmp_path) -> Path:
    """16 crazing images, 4 inclusion images: under a third."""
    root = copy_neu_subset(tmp_path / "neu", ("crazing",), 16)
    copy_neu_subset(tmp_path / "neu_small", ("inclusion",), 4)
    (tmp_path / "neu_small" / "inclusion").rename(root / "inclusion")
    return root


@pytest.mark.slow
def test_vit_at_64_px_with_a_budget_on_imbalanced_data(imbalanced_neu, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(imbalanced_neu), "--out", str(out), "--model", "vit_tiny_patch16_224",
            "--set", "data.image_size=64", "--budget", "3m", "--set", "export.onnx=false", *FAST]
    assert main(args) == 0, capsys.readouterr().err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["image_size"] == 64
    assert config["data"]["balance"] == "loss_weights"
    assert config["train"]["early_stopping"]["metric"] == "auroc"
    assert isinstance(config["train"]["epochs"], int) and isinstance(config["train"]["lr"], float)
    assert isinstance(config["train"]["early_stopping"]["patience"], int)
    epochs_run = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(epochs_run) <= config["train"]["epochs"]
    log = (out / "train.log").read_text()
    assert "class weights" in log and "time budget" in log and "-> " in log
    report = (out / "report.md").read_text()
    assert "Settings chosen for this data" in report and "class-weighted loss" in report
    assert "| split | balanced acc." in report


def test_a_budget_with_room_for_part_of_one_epoch_ends_after_it(tmp_path, capsys, monkeypatch):
    """The first epoch is cut to the steps that fit; the run then ends, instead of running
    further epochs with no step left in them (epochs of train_loss 0 that re-plan forever)."""
    from vision_ft.budget import BudgetPlanner

    # While the first epoch runs, the end of the run (evaluation, export) claims all of the budget
    # that is left; once that epoch is timed, almost nothing, so the budget would seem to have room.
    monkeypatch.setattr(BudgetPlanner, "final_seconds",
                        lambda self: self.budget_s - self.elapsed() if self.epoch_seconds is None else 1.0)
    data = copy_neu_subset(tmp_path / "neu", ("crazing", "inclusion"), 40)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "resnet18", "--budget", "10m",
                 "--set", "data.image_size=32", "--set", "export.onnx=false", "--set", "data.workers=0",
                 "--set", "train.batch_size=2", "--weights", "none"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = (out / "train.log").read_text()
    assert "does not fit" in log
    assert len(rows) == 1 and rows[0]["train_loss"] > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 1


@pytest.mark.slow
def test_lr_find_writes_a_plot_and_suggests_a_rate(tmp_path, capsys):
    data = copy_neu_subset(tmp_path / "neu", ("crazing", "inclusion"), 8)
    plot = tmp_path / "lr.png"
    assert main(["lr-find", "--data", str(data), "--model", "resnet18", "--set", "data.image_size=32",
                 "--steps", "12", "--start-lr", "1e-5", "--out", str(plot), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "suggested learning rate" in printed and "--set train.lr=" in printed
    assert plot.stat().st_size > 5000


@pytest.mark.parametrize("args, expected", [
    (["train", "--budget", "soon"], "train.time_budget"),
    (["train", "--set", "data.image_size=big"], "data.image_size"),
    (["train", "--set", "train.lr=fast"], "train.lr"),
    (["train", "--set", "train.epochs=0"], "train.epochs"),
    (["train", "--set", "data.balance=yes"], "data.balance"),
    (["train", "--set", "eval.tta=rotate"], "eval.tta"),
    (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], "start_lr < end_lr"),
])
def test_bad_values_are_one_line(args, expected, tmp_path, capsys):
    data = copy_neu_subset(tmp_path / "neu", ("crazing", "inclusion"), 4)
    assert main([*args, "--data", str(data), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (Path("runs").exists() and any(Path("runs").glob("neu-*")))
