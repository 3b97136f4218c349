"""eval.target_recall on a real multi-class inspection run (NEU-DET): the per-class threshold is
chosen on validation and reaches its recall there, is reported on test, travels in the ONNX
metadata, and the runtime marks the same images `uncertain` as the torch path does."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import vision_ft
from tests.real_data import copy_neu_subset, needs_neu
from vision_ft.cli import main
from vision_ft.decision import DecisionRule
from vision_ft.evaluation.run_evaluation import PREDICTIONS_FILE, read_predictions
from vision_ft.onnx_metadata import read_metadata
from vision_ft.predict import collect_images
from vision_ft.runtime import load_model

pytestmark = [pytest.mark.slow, needs_neu]
CLASSES = ["crazing", "inclusion", "scratches"]


def test_per_class_recall_threshold_from_validation_to_the_runtime(tmp_path):
    data = copy_neu_subset(tmp_path / "neu", tuple(CLASSES), 20)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "resnet18", "--weights", "none",
                 "--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.batch_size=16",
                 "--set", "train.epochs=2", "--set", "train.warmup_epochs=0", "--set", "data.val_fraction=0.3",
                 "--set", "eval.target_recall={scratches: 0.99}", "--set", "eval.bootstrap_resamples=200"]) == 0

    decision = json.loads((run / "decision.json").read_text())
    assert set(decision["class_thresholds"]) == {"scratches"}
    rule = DecisionRule.from_json(decision, CLASSES)
    val = read_predictions(run / PREDICTIONS_FILE, CLASSES)["val"]
    decided = rule.decide(rule.probabilities(val.logits))
    scratches = val.labels == CLASSES.index("scratches")
    assert scratches.any() and np.mean(decided[scratches] == CLASSES.index("scratches")) >= 0.99

    metrics = json.loads((run / "metrics.json").read_text())
    reported = metrics["class_thresholds_test"]
    assert set(reported["recall"]) == {"scratches"} and 0.0 <= reported["uncertain_fraction"] <= 1.0

    metadata = read_metadata(onnx.load(str(run / "model.onnx")), "model.onnx")
    assert metadata.decision["class_thresholds"] == decision["class_thresholds"]
    images = collect_images(data)
    by_torch = [p.label for p in vision_ft.load_run(run).predict(images)]
    by_runtime = [p.label for p in load_model(run / "model.onnx").predict(images)]
    assert by_runtime == by_torch
    assert set(by_torch) <= {*CLASSES, "uncertain"}
