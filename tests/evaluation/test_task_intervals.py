"""Bootstrap intervals of multi-label and regression metrics: the point values are the task's own
metrics, the intervals cover them, shrink with more images and widen when images of one patient
are resampled together."""

from __future__ import annotations

import numpy as np
import pytest

from vision_ft.evaluation.task_intervals import bootstrap_task_metrics, multilabel_resampled, regression_resampled
from vision_ft.tasks.multilabel import multilabel_metrics
from vision_ft.tasks.regression import regression_metrics


def _multilabel(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < [0.5, 0.2, 0.1]).astype(np.float64)
    probabilities = np.clip(0.35 * targets + rng.random((n, 3)) * 0.65, 0, 1)
    return targets, probabilities


def _regression(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.random((n, 2)) * [1.0, 50.0]
    return true + rng.normal(0, [0.1, 5.0], size=(n, 2)), true


def test_multilabel_point_values_are_the_task_metrics():
    targets, probabilities = _multilabel(300)
    thresholds = [0.5, 0.45, 0.6]
    expected = multilabel_metrics(probabilities, targets, ["a", "b", "c"], thresholds)
    predicted = probabilities >= np.asarray(thresholds)
    ci = bootstrap_task_metrics(lambda w: multilabel_resampled(w, targets, probabilities, predicted), 300,
                                n_resamples=400)
    for name in ("macro_auroc", "micro_auroc", "macro_f1", "micro_f1"):
        assert ci[name]["value"] == pytest.approx(expected[name], abs=1e-6)
        assert ci[name]["low"] < ci[name]["value"] < ci[name]["high"]


def test_regression_point_values_are_the_task_metrics():
    predicted, true = _regression(200)
    expected = regression_metrics(predicted, true, ["x", "y"])
    ci = bootstrap_task_metrics(lambda w: regression_resampled(w, predicted, true), 200, n_resamples=400)
    for name in ("rmse", "mae", "r2", "pearson"):
        assert ci[name]["value"] == pytest.approx(expected[name], rel=1e-6)
        assert ci[name]["low"] < ci[name]["value"] < ci[name]["high"]


def test_intervals_shrink_with_more_images():
    widths = []
    for n in (100, 1600):
        predicted, true = _regression(n, seed=1)
        ci = bootstrap_task_metrics(lambda w: regression_resampled(w, predicted, true), n, n_resamples=400)
        widths.append(ci["rmse"]["high"] - ci["rmse"]["low"])
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4 in theory


def test_patients_resampled_together_widen_the_interval():
    # 40 patients x 10 images, each patient's errors shifted alike: the images are not independent.
    rng = np.random.default_rng(2)
    true = rng.random((400, 1))
    predicted = true + np.repeat(rng.normal(0, 0.3, size=(40, 1)), 10, axis=0) + rng.normal(0, 0.02, size=(400, 1))
    groups = np.repeat([f"p{i}" for i in range(40)], 10)
    by_image = bootstrap_task_metrics(lambda w: regression_resampled(w, predicted, true), 400, n_resamples=400)
    by_patient = bootstrap_task_metrics(lambda w: regression_resampled(w, predicted, true), 400, groups=groups,
                                        n_resamples=400)
    width = {name: ci["rmse"]["high"] - ci["rmse"]["low"] for name, ci in (("image", by_image), ("patient", by_patient))}
    assert width["patient"] > 2 * width["image"]
