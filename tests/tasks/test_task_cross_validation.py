"""`vision-ft cv` for multi-label and regression runs on real images: folds partition the data
and keep patients whole, every fold is a normal run, and the summary pools the out-of-fold
scores with bootstrap intervals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.real_data import copy_neu_subset
from vision_ft.config import build_config
from vision_ft.cv import cross_validate

pytestmark = pytest.mark.slow

CLASSES = ("crazing", "inclusion", "patches", "scratches")
FINDINGS = {"crazing": "texture", "inclusion": "spot", "patches": "texture;spot", "scratches": ""}
SEVERITY = {"crazing": 0.0, "inclusion": 1.0, "patches": 2.0, "scratches": 3.0}


def _manifest(root: Path, kind: str) -> Path:
    path = root / f"{kind}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels" if kind == "multilabel" else "target", "patient"])
        for cls in CLASSES:
            for i, image in enumerate(sorted((root / cls).iterdir())):
                value = FINDINGS[cls] if kind == "multilabel" else f"{SEVERITY[cls] + 0.1 * i:.2f}"
                writer.writerow([f"{cls}/{image.name}", value, f"{cls}-{i // 2}"])  # two images per patient
    return path


def _config(manifest: Path, kind: str):
    return build_config(None, [f"task={kind}", "data.group_by=patient", "data.image_size=32", "data.workers=0",
                               "data.val_fraction=0.25", "train.batch_size=8", "train.epochs=1",
                               "train.warmup_epochs=0", "export.onnx=false", "eval.bootstrap_resamples=200"],
                        data_path=str(manifest), model_name="resnet18", model_weights="none")


@pytest.mark.parametrize("kind", ["multilabel", "regression"])
def test_cross_validation_of_a_task_pools_out_of_fold_scores(tmp_path, kind):
    root = copy_neu_subset(tmp_path / "data", CLASSES, 8)
    result = cross_validate(_config(_manifest(root, kind), kind), tmp_path / "CV", folds=2)
    summary = json.loads((tmp_path / "CV" / "summary.json").read_text())
    assert summary["task"] == kind and len(summary["per_fold"]) == 2 == len(result.folds)

    with (tmp_path / "CV" / "oof_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 32  # every image tested exactly once
    patients = {}
    for row in rows:  # a patient is tested in one fold only
        assert patients.setdefault(row["group"], row["fold"]) == row["fold"]
    assert len(patients) == 16

    pooled = summary["pooled_out_of_fold"][summary["replicates"][0]]
    headline = "macro_auroc" if kind == "multilabel" else "rmse"
    ci = pooled["ci"][headline]
    assert ci["low"] <= pooled["metrics"][headline] <= ci["high"]
    assert summary["over_folds"][headline]["n"] == 2
    report = (tmp_path / "CV" / "report.md").read_text()
    assert f"task: {kind}" in report and headline in report
    for fold in result.folds:  # each fold is an ordinary run with its task's files
        assert (fold / "metrics.json").is_file() and (fold / "predictions.csv").is_file()
