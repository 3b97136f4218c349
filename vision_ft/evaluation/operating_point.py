"""Decision thresholds chosen on validation for a target sensitivity, specificity or recall.

A screening model is read at an operating point, not at argmax: "95 % of pneumonias flagged"
fixes the threshold on the validation split, and the test split then says what that costs in
specificity and PPV (with confidence intervals, from `bootstrap`). Thresholds are chosen so
that the target is reached on validation, halfway between two validation scores so that a score
computed a few ulps differently elsewhere does not flip a decision.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def _midpoint(chosen: float, scores: np.ndarray, above: bool) -> float:
    """Halfway from `chosen` to the nearest other score above (or below) it.

    Any threshold in that gap makes the same decisions on these images; the middle keeps an
    image whose score equals `chosen` from flipping when another runtime computes it a few ulps
    differently (onnxruntime and torch differ by about 1e-8).
    """
    others = scores[scores > chosen] if above else scores[scores < chosen]
    if len(others) == 0:  # nothing beyond: a margin far above float noise, far below score steps
        margin = max(1e-6, abs(chosen) * 1e-6)
        return float(chosen + margin if above else chosen - margin)
    neighbour = others.min() if above else others.max()
    return float((chosen + neighbour) / 2)


def threshold_for_sensitivity(is_positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The threshold t (score >= t flags) that flags at least `target` of the positives and as few
    images as possible: between the needed positive's score and the next lower score."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.sort(scores[np.asarray(is_positive, dtype=bool)])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive images to choose a sensitivity threshold on")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return _midpoint(float(positives[needed - 1]), scores, above=False)


def threshold_for_specificity(is_positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The threshold t (score < t clears) that clears at least `target` of the negatives and flags
    as many images as possible: between the needed negative's score and the next higher score."""
    scores = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(scores[~np.asarray(is_positive, dtype=bool)])
    if len(negatives) == 0:
        raise ValueError("no negative images to choose a specificity threshold on")
    needed = math.ceil(target * len(negatives) - 1e-9)
    if needed <= 0:
        return float(negatives[0])
    return _midpoint(float(negatives[needed - 1]), scores, above=True)


def class_recall_thresholds(labels: np.ndarray, probabilities: np.ndarray, targets: dict[int, float]) -> dict[int, float]:
    """Per class, the highest probability threshold that keeps its recall at the target on these images."""
    labels = np.asarray(labels)
    return {k: threshold_for_sensitivity(labels == k, probabilities[:, k], target) for k, target in sorted(targets.items())}


def binary_rates(is_positive: np.ndarray, flagged: np.ndarray) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV and F1 of flagged-as-positive decisions."""
    is_positive = np.asarray(is_positive, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    tp = int((is_positive & flagged).sum())
    fn = int((is_positive & ~flagged).sum())
    fp = int((~is_positive & flagged).sum())
    tn = int((~is_positive & ~flagged).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def plot_roc_pr(is_positive: np.ndarray, scores: np.ndarray, folder: Path, positive_name: str,
                threshold: float | None = None, split: str = "test") -> list[Path]:
    """roc_<split>.png and pr_<split>.png with AUROC / average precision, the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return []  # curves need both classes
    fpr, tpr, _ = roc_curve(is_positive, scores)
    precision, recall, _ = precision_recall_curve(is_positive, scores)
    auroc = roc_auc_score(is_positive, scores)
    ap = average_precision_score(is_positive, scores)
    point = None
    if threshold is not None:
        rates = binary_rates(is_positive, np.asarray(scores) >= threshold)
        point = rates
    paths = [folder / f"roc_{split}.png", folder / f"pr_{split}.png"]
    for path, (x, y, xlabel, ylabel, title) in zip(paths, (
        (fpr, tpr, "1 - specificity", "sensitivity", f"ROC, {split} ({positive_name} positive): AUROC {auroc:.3f}"),
        (recall, precision, "recall (sensitivity)", "precision (PPV)", f"PR, {split} ({positive_name}): AP {ap:.3f}"),
    )):
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(x, y, drawstyle="steps-post")
        if point is not None and point["sensitivity"] is not None:
            px = 1 - point["specificity"] if path.stem.startswith("roc") else point["sensitivity"]
            py = point["sensitivity"] if path.stem.startswith("roc") else point["ppv"]
            if py is not None:
                ax.plot([px], [py], "o", color="red", label=f"threshold {threshold:.3f}")
                ax.legend(loc="lower right" if path.stem.startswith("roc") else "lower left")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths
