import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vision_ft.metrics import compute_metrics, format_summary


def test_binary_metrics_against_hand_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95])
    probs = np.stack([1 - p1, p1], axis=1)
    m = compute_metrics(labels, probs, ["ok", "defect"])
    # predictions: 0 1 0 1 1 0 1 1 -> 6 of 8 right
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["per_class"]["defect"]["precision"] == pytest.approx(4 / 5)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["macro_f1"] == pytest.approx(((2 * 2 / 3 * 2 / 3) / (4 / 3) + (2 * 0.8 * 0.8) / 1.6) / 2)


def test_multiclass_auroc_with_an_absent_class_is_defined():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1, 0, 1])  # class 2 never appears
    probs = rng.dirichlet(np.ones(3), size=6)
    m = compute_metrics(labels, probs, ["a", "b", "c"])
    assert m["auroc"] is not None and 0.0 <= m["auroc"] <= 1.0
    assert m["per_class"]["c"]["support"] == 0


def test_single_class_has_no_auroc_and_summary_skips_it():
    m = compute_metrics(np.zeros(4, dtype=int), np.tile([0.8, 0.2], (4, 1)), ["a", "b"])
    assert m["auroc"] is None
    assert "auroc" not in format_summary(m)
    assert "accuracy 1.0000" in format_summary(m)
