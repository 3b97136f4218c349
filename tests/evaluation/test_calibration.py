"""Temperature scaling fixes a synthetic over-confident model; the measures mean what they say."""

import numpy as np
import pytest

from vision_ft.decision import calibrated_softmax
from vision_ft.evaluation.calibration import (
    brier_score,
    calibration_measures,
    choose_temperature,
    expected_calibration_error,
    fit_temperature,
)


def _calibrated_logits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels are drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, classes))
    probs = calibrated_softmax(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    return logits, labels


def test_temperature_scaling_repairs_an_over_confident_model():
    val_logits, val_labels = _calibrated_logits(3000, 3, seed=0)
    test_logits, test_labels = _calibrated_logits(3000, 3, seed=1)
    over_confident = 3.0  # logits inflated three-fold, as fine-tuned networks tend to be
    temperature = fit_temperature(val_logits * over_confident, val_labels)
    assert temperature == pytest.approx(over_confident, rel=0.15)
    before = calibration_measures(calibrated_softmax(test_logits * over_confident), test_labels)
    after = calibration_measures(calibrated_softmax(test_logits * over_confident, temperature), test_labels)
    assert after["ece"] < before["ece"] / 2
    assert after["nll"] < before["nll"]
    assert after["brier"] < before["brier"]


def test_auto_keeps_temperature_only_when_validation_nll_does_not_rise():
    logits, labels = _calibrated_logits(2000, 2, seed=2)
    value, info = choose_temperature("auto", logits * 2.5, labels)
    assert info["applied"] and value == pytest.approx(info["fitted"]) and info["val_nll_after"] < info["val_nll_before"]
    value, info = choose_temperature("none", logits, labels)
    assert value == 1.0
    value, info = choose_temperature(1.7, logits, labels)
    assert value == 1.7 and info["val_nll_after"] > info["val_nll_before"]


def test_measures_on_known_cases():
    labels = np.array([0, 1, 1, 0])
    perfect = np.eye(2)[labels]
    assert brier_score(perfect, labels) == 0.0
    assert expected_calibration_error(perfect, labels) == 0.0
    # Always 0.9 confident, right half the time: ECE = |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(probs, np.array([0, 1, 0, 1])) == pytest.approx(0.4)


def test_calibrated_softmax_is_stable_and_rejects_bad_temperature():
    probs = calibrated_softmax(np.array([[1000.0, 0.0], [0.0, -1000.0]]), 2.0)
    assert np.allclose(probs, [[1, 0], [1, 0]]) and np.isfinite(probs).all()
    with pytest.raises(ValueError):
        calibrated_softmax(np.zeros((1, 2)), 0.0)


def test_a_small_temperature_does_not_change_the_test_intervals_roc_auc():
    """Confident logits under T = 0.02: most calibrated probabilities round to exactly 1.0, but the
    interval's ROC-AUC ranks the images as the model does, so it equals the T = 1 value."""
    from vision_ft.config import EvalConfig
    from vision_ft.decision import DecisionRule, log_softmax
    from vision_ft.evaluation.bootstrap import weighted_auroc
    from vision_ft.evaluation.run_evaluation import SplitPredictions, evaluate_test

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    margin = rng.normal(4.0 * (2 * labels - 1), 4.0)  # overlapping classes, |margin| mostly > 1
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    assert (calibrated_softmax(logits, 0.02)[:, 1] == 1.0).sum() > 100  # the ties a float64 softmax makes
    settings = EvalConfig(bootstrap_resamples=50)
    test = SplitPredictions(logits, labels, [f"{i}.png" for i in range(len(labels))])
    cold = evaluate_test(DecisionRule(temperature=0.02), test, ["a", "b"], settings)["test_ci"]["auroc"]["value"]
    plain = evaluate_test(DecisionRule(temperature=1.0), test, ["a", "b"], settings)["test_ci"]["auroc"]["value"]
    assert cold == pytest.approx(plain)
    ones = np.ones((1, len(labels)), np.float32)
    exact = float(weighted_auroc(ones, labels == 1, margin)[0])
    assert plain == pytest.approx(exact, abs=1e-9)
    assert np.allclose(np.exp(log_softmax(logits)), calibrated_softmax(logits))
