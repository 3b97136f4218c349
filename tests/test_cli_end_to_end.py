"""End to end through the `vision-ft` command line on real NEU-DET steel-defect images."""

import csv
import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.real_data import RUN_CLASSES as CLASSES, RUN_PER_CLASS as PER_CLASS, needs_neu
from tests.interrupt import interrupt_at_epoch
from vision_ft.cli import main

FAST = ["--set", "data.image_size=64", "--set", "data.workers=0", "--set", "train.batch_size=16",
        "--set", "train.warmup_epochs=0", "--weights", "none", "--model", "resnet18"]

pytestmark = [
    pytest.mark.slow,
    needs_neu,
]


def test_train_leaves_a_complete_run_folder(trained_run, capsys):
    for name in ("config.yaml", "split.json", "metrics.jsonl", "metrics.json", "report.md", "train.log",
                 "checkpoints/best/model.safetensors", "checkpoints/last/optimizer.safetensors",
                 "plots/confusion_test.png", "plots/training_curves.png", "model.onnx"):
        assert (trained_run / name).is_file(), name
    # The ONNX model written at the end of training predicts like the best checkpoint.
    from vision_ft.runtime import load_model

    model = load_model(trained_run / "model.onnx")
    assert model.class_names == list(CLASSES)
    assert "model.onnx" in (trained_run / "report.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"accuracy", "balanced_accuracy", "macro_f1", "auroc"} <= metrics[split].keys()
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == metrics[split]["num_samples"]
    split = json.loads((trained_run / "split.json").read_text())
    assert split["class_names"] == list(CLASSES)
    epochs = [json.loads(line)["epoch"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_existing_run_is_not_overwritten(trained_run, neu_subset, capsys):
    before = (trained_run / "metrics.json").read_text()
    code = main(["train", "--data", str(neu_subset), "--out", str(trained_run), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: run folder") and "--resume" in err and "\n" not in err
    assert (trained_run / "metrics.json").read_text() == before


def test_eval_on_a_folder_matches_the_test_split_metrics_format(trained_run, neu_subset, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--data", str(neu_subset), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == len(CLASSES) * PER_CLASS
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert out.with_suffix(".png").is_file()


def test_predict_writes_csv_with_labels_and_top_k(trained_run, neu_subset, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run), str(neu_subset / "scratches"), "--out", str(out), "--top-k", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == PER_CLASS
    assert list(rows[0]) == ["path", "label", "score", "top1_label", "top1_score", "top2_label", "top2_score", "error"]
    for row in rows:
        assert row["label"] in CLASSES and row["label"] == row["top1_label"]
        assert float(row["top1_score"]) >= float(row["top2_score"])


def test_resume_continues_from_the_last_checkpoint(trained_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run, resumed)
    assert main(["train", "--resume", "--out", str(resumed), "--set", "train.epochs=3"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    state = json.loads((resumed / "checkpoints/last/state.json").read_text())
    assert state["epoch"] == 3


def test_resume_equals_an_uninterrupted_run(neu_subset, tmp_path, monkeypatch):
    # No augmentation: then the only randomness is the epoch's shuffle, which is seeded by epoch.
    same = ["--set", "train.epochs=3", "--set", "data.augment.train=[]", "--set", "export.onnx=false", *FAST]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert main(["train", "--data", str(neu_subset), "--out", str(whole), *same]) == 0

    stop_interrupting = interrupt_at_epoch(monkeypatch, 3)
    assert main(["train", "--data", str(neu_subset), "--out", str(interrupted), *same]) == 130
    stop_interrupting()
    assert main(["train", "--resume", "--out", str(interrupted)]) == 0

    a = load_file(str(whole / "checkpoints/last/model.safetensors"))
    b = load_file(str(interrupted / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() < 1e-5, key
