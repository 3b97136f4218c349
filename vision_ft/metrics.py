"""Classification metrics from predicted probabilities, computed with scikit-learn."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

# Balanced accuracy and macro metrics lead: on imbalanced data plain accuracy rewards
# predicting the majority class.
SUMMARY_KEYS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")
# Multi-label and regression summaries (vision_ft.tasks); absent keys are skipped.
_OTHER_TASK_KEYS = ("macro_auroc", "map", "micro_auroc", "micro_f1", "rmse", "mae", "r2", "pearson", "spearman")


def _auroc(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> float | None:
    present = np.unique(labels)
    if len(present) < 2:
        return None  # undefined with a single class present
    if num_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < num_classes:
        # Rank only among the classes present; absent classes have no positives to rank.
        cols = probs[:, present]
        cols = cols / np.clip(cols.sum(axis=1, keepdims=True), 1e-12, None)
        relabelled = np.searchsorted(present, labels)
        if len(present) == 2:
            return float(roc_auc_score(relabelled, cols[:, 1]))
        return float(roc_auc_score(relabelled, cols, multi_class="ovr", average="macro"))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, ROC-AUC (binary or one-vs-rest macro),
    per-class precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    with warnings.catch_warnings():
        # Small or skewed evaluation sets make sklearn warn about absent classes; they are handled.
        warnings.simplefilter("ignore", UserWarning)
        return _compute(np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64), class_names)


def _compute(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    k = len(class_names)
    preds = probs.argmax(axis=1)
    all_labels = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=all_labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=all_labels, average="macro", zero_division=0)),
        "auroc": _auroc(labels, probs, k),
        "num_samples": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(labels, preds, labels=all_labels).tolist(),
    }


def format_summary(metrics: dict[str, Any]) -> str:
    """`accuracy 0.912  balanced_accuracy 0.900 ...` for logs and the CLI."""
    parts = []
    for key in ("loss", *SUMMARY_KEYS, *_OTHER_TASK_KEYS):
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)
