"""Bootstrap intervals: exact point estimates, coverage of the point, shrinking with data, groups."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from vision_ft.evaluation.bootstrap import bootstrap_metrics, format_with_ci, resample_weights, weighted_auroc


def _predictions(n: int, classes: int, seed: int, skill: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    probs = rng.dirichlet(np.ones(classes), n)
    probs[np.arange(n), labels] += skill
    probs = np.round(probs / probs.sum(1, keepdims=True), 2)  # rounding makes ties, as real scores have
    return labels, probs / probs.sum(1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 4])
def test_point_estimates_equal_sklearn(classes):
    labels, probs = _predictions(600, classes, seed=classes)
    result = bootstrap_metrics(labels, probs, n_resamples=50)
    predicted = probs.argmax(1)
    assert result["accuracy"]["value"] == pytest.approx(accuracy_score(labels, predicted))
    assert result["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result["macro_f1"]["value"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-6)
    expected_auc = roc_auc_score(labels, probs[:, 1]) if classes == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert result["auroc"]["value"] == pytest.approx(expected_auc)


def test_weighted_auroc_equals_sklearn_with_sample_weights():
    labels, probs = _predictions(300, 2, seed=7)
    weights = np.random.default_rng(1).integers(0, 4, size=(3, 300)).astype(np.float32)
    ours = weighted_auroc(weights, labels == 1, probs[:, 1])
    for row, value in zip(weights, ours):
        assert value == pytest.approx(roc_auc_score(labels, probs[:, 1], sample_weight=row))


def test_binary_rates_match_their_definitions():
    labels, probs = _predictions(400, 2, seed=3)
    predicted = (probs[:, 1] >= 0.3).astype(int)
    result = bootstrap_metrics(labels, probs, predicted=predicted, positive=1, n_resamples=20)
    tp = np.sum((labels == 1) & (predicted == 1))
    fp = np.sum((labels == 0) & (predicted == 1))
    assert result["sensitivity"]["value"] == pytest.approx(tp / np.sum(labels == 1))
    assert result["ppv"]["value"] == pytest.approx(tp / (tp + fp))


def test_interval_contains_point_and_shrinks_with_more_data():
    small = bootstrap_metrics(*_predictions(200, 3, seed=0), seed=0)
    large = bootstrap_metrics(*_predictions(5000, 3, seed=0), seed=0)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        for result in (small, large):
            assert result[name]["low"] <= result[name]["value"] <= result[name]["high"], name
        width_small = small[name]["high"] - small[name]["low"]
        width_large = large[name]["high"] - large[name]["low"]
        # sqrt(5000 / 200) = 5: the interval narrows about five-fold.
        assert width_large < width_small / 3, name


def test_seeded_and_reproducible():
    labels, probs = _predictions(300, 2, seed=1)
    assert bootstrap_metrics(labels, probs, seed=4) == bootstrap_metrics(labels, probs, seed=4)
    assert bootstrap_metrics(labels, probs, seed=4) != bootstrap_metrics(labels, probs, seed=5)


def test_resamples_keep_class_counts():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 65)
    weights = resample_weights(labels, None, 40, np.random.default_rng(0))
    for k in range(3):
        assert np.all(weights[:, labels == k].sum(axis=1) == np.sum(labels == k))


def test_groups_are_resampled_whole_and_widen_the_interval():
    # 40 patients x 10 images; a patient's images are all right or all wrong, so the effective
    # sample size is 40, not 400: the grouped interval must be much wider.
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10)
    labels = np.repeat(rng.integers(0, 2, 40), 10)
    correct = np.repeat(rng.random(40) < 0.8, 10)
    predicted = np.where(correct, labels, 1 - labels)
    probs = np.eye(2)[predicted] * 0.8 + 0.1
    weights = resample_weights(labels, groups, 5, rng)
    per_group = weights.reshape(5, 40, 10)
    assert np.all(per_group == per_group[:, :, :1])  # all images of a patient drawn together
    by_image = bootstrap_metrics(labels, probs, seed=0)["accuracy"]
    by_group = bootstrap_metrics(labels, probs, groups=groups, seed=0)["accuracy"]
    assert (by_group["high"] - by_group["low"]) > 2 * (by_image["high"] - by_image["low"])


def test_format_with_ci():
    assert format_with_ci(0.9123, {"low": 0.871, "high": 0.9481}) == "0.912 (0.871–0.948)"
    assert format_with_ci(None, None) == "n/a"
