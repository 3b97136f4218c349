"""Temperature scaling (Guo et al., 2017) and the calibration measures it is judged by.

One scalar T divides every logit: it changes no argmax, so accuracy stays, but over-confident
probabilities (common after fine-tuning) move toward the observed frequencies. T is fitted
on the validation logits by minimising the negative log-likelihood, then judged on test by
ECE (15 equal-width confidence bins), Brier score and NLL, before and after.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from vision_ft.decision import calibrated_softmax

ECE_BINS = 15
# log T is searched in [-4, 4], T in [0.018, 55]: far beyond any temperature seen in practice.
_LOG_T_BOUND = 4.0


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-15, 1.0)).mean())


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance between the probability vector and the one-hot label (0 best, 2 worst)."""
    one_hot = np.zeros_like(probabilities)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return float(((probabilities - one_hot) ** 2).sum(axis=1).mean())


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: images, mean confidence, accuracy (NaN when empty)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct.astype(np.float64), minlength=bins) / count
    return {"count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (images in bin / all) * |accuracy - mean confidence|."""
    table = reliability_bins(probabilities, labels, bins)
    filled = table["count"] > 0
    gap = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float((table["count"][filled] / len(labels) * gap).sum())


def calibration_measures(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"ece", "brier", "nll"} of probabilities against labels."""
    labels = np.asarray(labels, dtype=np.int64)
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "brier": brier_score(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (a 1-D bounded search over log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        return negative_log_likelihood(calibrated_softmax(logits, math.exp(log_t)), labels)

    found = minimize_scalar(nll, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def choose_temperature(setting: str | float, val_logits: np.ndarray, val_labels: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The temperature to ship for `calibration.temperature` (auto | none | a number), and why.

    auto fits T on validation and keeps it only when it does not raise the validation NLL
    (with few validation images a fitted T can overfit); none is T = 1.
    """
    labels = np.asarray(val_labels, dtype=np.int64)
    before = negative_log_likelihood(calibrated_softmax(val_logits, 1.0), labels)
    if setting == "none":
        return 1.0, {"setting": "none", "val_nll_before": before}
    if setting == "auto":
        fitted = fit_temperature(val_logits, labels)
        after = negative_log_likelihood(calibrated_softmax(val_logits, fitted), labels)
        applied = after <= before
        return (fitted if applied else 1.0), {"setting": "auto", "fitted": fitted, "applied": applied,
                                              "val_nll_before": before, "val_nll_after": after}
    value = float(setting)
    return value, {"setting": value, "val_nll_before": before,
                   "val_nll_after": negative_log_likelihood(calibrated_softmax(val_logits, value), labels)}


def plot_reliability(before: np.ndarray, after: np.ndarray | None, labels: np.ndarray, path: Path, title: str) -> None:
    """Reliability diagram: accuracy against confidence per bin, before (and after) scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for probabilities, name in ((before, "uncalibrated"), (after, "temperature-scaled")):
        if probabilities is None:
            continue
        table = reliability_bins(probabilities, labels)
        filled = table["count"] > 0
        ece = expected_calibration_error(probabilities, labels)
        ax.plot(table["confidence"][filled], table["accuracy"][filled], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
