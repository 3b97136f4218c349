"""A trained run's temperature and threshold reach the ONNX metadata, and the torch-free runtime
applies them exactly as the torch path (`predict RUN`) does."""

import json

import numpy as np
import onnx
import pytest

import vision_ft

from tests.evaluation.pneumonia_data import FAST, write_patients
from vision_ft.cli import main
from vision_ft.errors import VisionFTError
from vision_ft.onnx_metadata import ModelMetadata, read_metadata
from vision_ft.predict import collect_images
from vision_ft.runtime import load_model


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    data = write_patients(tmp_path_factory.mktemp("pneumonia"), per_class=30)
    out = tmp_path_factory.mktemp("runs") / "run"
    # A fixed temperature of 2 makes the parity check meaningful even when "auto" would pick ~1.
    assert main(["train", "--data", str(data), "--out", str(out), *FAST, "--set", "data.group_by=(?P<group>P\\d+)_",
                 "--set", "eval.positive_class=pneumonia", "--set", "eval.target_sensitivity=0.9",
                 "--set", "calibration.temperature=2.0", "--set", "eval.bootstrap_resamples=500"]) == 0
    return data, out


@pytest.mark.slow
def test_run_records_calibration_threshold_and_intervals(calibrated_run, capsys):
    data, run = calibrated_run
    decision = json.loads((run / "decision.json").read_text())
    assert decision["temperature"] == 2.0 and decision["positive_class"] == "pneumonia"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["operating_point"]["val"]["sensitivity"] >= 0.9  # reached on the split it was chosen on
    ci = metrics["test_ci"]["accuracy"]
    assert ci["low"] <= metrics["test"]["accuracy"] <= ci["high"]
    assert set(metrics["calibration_test"]["before"]) == {"ece", "brier", "nll"}
    assert set(metrics["operating_point_test"]) >= {"sensitivity", "specificity", "ppv", "npv", "f1"}
    for plot in ("reliability_test.png", "roc_test.png", "pr_test.png"):
        assert (run / "plots" / plot).is_file()
    report = (run / "report.md").read_text()
    assert "test (95% CI" in report and "–" in report
    split = json.loads((run / "split.json").read_text())
    assert split["groups"]["pneumonia/P1000_2.png"] == "P1000"


@pytest.mark.slow
def test_runtime_applies_temperature_and_threshold_as_torch_does(calibrated_run, tmp_path):
    data, run = calibrated_run
    metadata = read_metadata(onnx.load(str(run / "model.onnx")), "model.onnx")
    assert metadata.decision == json.loads((run / "decision.json").read_text())
    images = collect_images(data)[::3]
    torch_predictions = vision_ft.load_run(run).predict(images)  # what `vision-ft predict RUN` prints
    model = load_model(run / "model.onnx")
    runtime = model.predict(images)
    for torch_prediction, prediction in zip(torch_predictions, runtime):
        assert prediction.label == torch_prediction.label
        assert np.allclose(prediction.probabilities, torch_prediction.probabilities, atol=1e-5)
    # Probabilities are the tempered softmax: sharper without the temperature.
    logits = model.logits(model.preprocess(images))
    assert np.allclose(model.predict_proba(images), np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True), atol=1e-6)
    # The reject band keeps working on top of the operating threshold.
    banded = model.predict(images, threshold=0.99)
    assert all(p.label == "uncertain" for p in banded if p.probabilities.max() < 0.99)


def test_decision_metadata_round_trips_and_bad_values_are_refused():
    base = dict(class_names=["normal", "pneumonia"], input_size=[28, 28], channels=1, mean=[0.5], std=[0.25],
                backbone="resnet18", vision_ft_version="0", split_fingerprint="x")
    decision = {"temperature": 1.7, "positive_class": "pneumonia", "positive_threshold": 0.21, "class_thresholds": {}}
    metadata = ModelMetadata(**base, decision=decision)
    assert ModelMetadata.from_properties(metadata.to_properties(), "m.onnx").decision == decision
    assert ModelMetadata.from_properties(ModelMetadata(**base).to_properties(), "m.onnx").decision == {}
    for bad in ({"temperature": -1.0}, {"temperature": 1.0, "positive_class": "crack"}, {"temperature": "hot"}):
        with pytest.raises(VisionFTError, match="decision"):
            ModelMetadata.from_properties(ModelMetadata(**base, decision=bad).to_properties(), "m.onnx")
