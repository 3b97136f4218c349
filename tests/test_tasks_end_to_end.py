"""Multi-label and regression runs end to end on real images: train, eval, predict, export, and
the torch-free runtime agreeing with torch; bad manifests end in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.real_data import copy_neu_subset
from vision_ft.cli import main
from vision_ft.onnx_metadata import read_metadata
from vision_ft.runtime import load_model

pytestmark = pytest.mark.slow

FAST = ["--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.batch_size=8", "--set",
        "train.warmup_epochs=0", "--set", "train.epochs=2", "--weights", "none", "--model", "resnet18"]
# Synthetic findings per NEU-DET class: two labels, their combination, and images with no finding.
FINDINGS = {"crazing": "texture", "inclusion": "spot", "patches": "texture;spot", "scratches": ""}


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.fixture(scope="module")
def multilabel_manifest(tmp_path_factory) -> Path:
    root = copy_neu_subset(tmp_path_factory.mktemp("ml"), tuple(FINDINGS), 10)
    rows = [[f"{cls}/{image.name}", labels] for cls, labels in FINDINGS.items() for image in sorted((root / cls).iterdir())]
    return _write_csv(root / "findings.csv", ["path", "labels"], rows)


@pytest.fixture(scope="module")
def multilabel_run(multilabel_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ml"
    assert main(["train", "--data", str(multilabel_manifest), "--out", str(out), "--set", "task=multilabel",
                 "--set", "train.pos_weight=auto", *FAST]) == 0
    return out


def test_multilabel_run_end_to_end(multilabel_run, multilabel_manifest, tmp_path):
    run = multilabel_run
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"macro_auroc", "map", "macro_f1", "micro_auroc", "micro_f1", "loss"} <= metrics[split].keys()
        assert set(metrics[split]["per_label"]) == {"spot", "texture"}
    split = json.loads((run / "split.json").read_text())
    # Iterative stratification: both labels and the empty set reach every split.
    for part in ("train", "val", "test"):
        targets = np.array([entry[2] for entry in split["splits"][part]])
        assert targets.sum(axis=0).min() >= 1 and (targets.sum(axis=1) == 0).any()
    thresholds = json.loads((run / "task.json").read_text())["thresholds"]
    assert [metrics["test"]["per_label"][n]["threshold"] for n in ("spot", "texture")] == thresholds
    assert (run / "plots" / "precision_recall_test.png").is_file() and "macro_auroc" in (run / "report.md").read_text()
    assert json.loads(next(iter((run / "metrics.jsonl").read_text().splitlines())))["val_macro_auroc"] is not None

    metadata = read_metadata(onnx.load(str(run / "model.onnx")), "model.onnx")
    assert metadata.task == "multilabel" and metadata.task_info["thresholds"] == thresholds
    assert metadata.output_name == "probabilities"

    assert main(["eval", str(run), "--data", str(multilabel_manifest), "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["num_samples"] == 40

    images = multilabel_manifest.parent / "patches"
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(run / "model.onnx"), str(images), "--out", str(tmp_path / "onnx.csv")]) == 0
    by_torch, by_onnx = _rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")
    assert list(by_torch[0]) == ["path", "labels", "score_spot", "score_texture", "error"]
    assert [r["labels"] for r in by_torch] == [r["labels"] for r in by_onnx]
    for a, b in zip(by_torch, by_onnx):
        assert abs(float(a["score_spot"]) - float(b["score_spot"])) < 1e-4
    # The runtime returns label sets: the labels at or above their thresholds.
    model = load_model(run / "model.onnx")
    for prediction, row in zip(model.predict(sorted(images.iterdir())), by_torch):
        expected = {name for name, t in zip(["spot", "texture"], thresholds) if float(row[f"score_{name}"]) >= t}
        assert prediction.labels == expected


def test_multilabel_bad_inputs_end_in_one_line(multilabel_run, multilabel_manifest, tmp_path, capsys):
    root = multilabel_manifest.parent
    unknown = _write_csv(root / "unknown.csv", ["path", "labels"], [["crazing/" + p.name, "texture;rust"]
                                                                        for p in sorted((root / "crazing").iterdir())[:3]])
    err = _error_line(capsys, ["eval", str(multilabel_run), "--data", str(unknown)])
    assert "label 'rust' is not one the run was trained on" in err and "line 2" in err
    columns = _write_csv(root / "columns.csv", ["path", "spot", "texture"], [["crazing/" + p.name, "1", "yes"]
                                                                             for p in sorted((root / "crazing").iterdir())])
    err = _error_line(capsys, ["train", "--data", str(columns), "--out", str(tmp_path / "r"), "--set", "task=multilabel",
                               "--set", "data.label_columns=[spot,texture]", *FAST])
    assert "column texture holds 'yes'" in err and not (tmp_path / "r").exists()
    err = _error_line(capsys, ["train", "--data", str(multilabel_manifest), "--out", str(tmp_path / "r"),
                               "--set", "task=multilabel", "--set", "train.early_stopping.metric=rmse", *FAST])
    assert "does not apply to task multilabel" in err


@pytest.fixture(scope="module")
def elpv_manifest(tmp_path_factory) -> Path:
    """40 real ELPV cells (10 per defect probability) as a regression manifest."""
    elpv = pytest.importorskip("elpv_dataset")
    data = Path(elpv.__file__).parent / "data"
    by_level: dict[float, list[str]] = {}
    for line in (data / "labels.csv").read_text().splitlines():
        path, probability, _ = line.split()
        by_level.setdefault(float(probability), []).append(path)
    rows = [[str(data / path), f"{level:.6f}"] for level, paths in sorted(by_level.items()) for path in paths[:10]]
    return _write_csv(tmp_path_factory.mktemp("elpv") / "elpv.csv", ["path", "target"], rows)


@pytest.fixture(scope="module")
def regression_run(elpv_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reg"
    assert main(["train", "--data", str(elpv_manifest), "--out", str(out), "--set", "task=regression",
                 "--set", "train.regression_loss=huber", *FAST]) == 0
    return out


def test_regression_run_end_to_end(regression_run, elpv_manifest, tmp_path):
    run = regression_run
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"rmse", "mae", "r2", "pearson", "spearman", "loss"} <= metrics[split].keys()
        assert 0.0 <= metrics[split]["rmse"] < 5.0  # original units (probabilities), not standardised ones
    stats = json.loads((run / "task.json").read_text())
    train = [e[2][0] for e in json.loads((run / "split.json").read_text())["splits"]["train"]]
    assert stats["target_mean"] == pytest.approx([np.mean(train)]) and stats["target_std"] == pytest.approx([np.std(train)])
    for plot in ("scatter_test.png", "residuals_test.png", "training_curves.png"):
        assert (run / "plots" / plot).is_file()
    assert "rmse" in (run / "report.md").read_text()

    metadata = read_metadata(onnx.load(str(run / "model.onnx")), "model.onnx")
    assert metadata.task == "regression" and metadata.output_name == "values"

    assert main(["eval", str(run), "--data", str(elpv_manifest), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_samples"] == 40 and evaluated["rmse"] > 0

    images = tmp_path / "cells"
    images.mkdir()
    for row in _rows(elpv_manifest)[::5]:
        (images / Path(row["path"]).name).symlink_to(row["path"])
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(run / "model.onnx"), str(images), "--out", str(tmp_path / "onnx.csv")]) == 0
    by_torch, by_onnx = _rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")
    assert list(by_torch[0]) == ["path", "target", "error"] and len(by_torch) == 8
    values = [float(r["target"]) for r in by_torch]
    assert max(abs(a - float(b["target"])) for a, b in zip(values, by_onnx)) < 1e-4
    model = load_model(run / "model.onnx")
    runtime_values = [p.values[0] for p in model.predict(sorted(images.iterdir()))]
    assert np.allclose(runtime_values, values, atol=1e-4)


def test_regression_bad_inputs_end_in_one_line(elpv_manifest, tmp_path, capsys):
    rows = _rows(elpv_manifest)
    text = _write_csv(tmp_path / "text.csv", ["path", "target"], [[r["path"], r["target"]] for r in rows[:-1]]
                      + [[rows[-1]["path"], "high"]])
    err = _error_line(capsys, ["train", "--data", str(text), "--out", str(tmp_path / "r"), "--set", "task=regression", *FAST])
    assert f"line {len(rows) + 1}" in err and "'high', not a finite number" in err and not (tmp_path / "r").exists()
    err = _error_line(capsys, ["train", "--data", str(elpv_manifest), "--out", str(tmp_path / "r"), "--set",
                               "task=regression", "--set", "data.target_columns=[defect,area]", *FAST])
    assert "lacks the columns defect, area" in err
