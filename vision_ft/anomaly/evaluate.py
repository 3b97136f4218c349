"""Scoring images with a fitted anomaly model and the metrics of those scores.

Metrics take normalised scores and labels only (no torch), so evaluation of a run folder, of
an exported model and of research scripts share them.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score
from tqdm import tqdm

from vision_ft.anomaly.decision import THRESHOLD, anomaly_labels, is_defective
from vision_ft.anomaly.scorer import AnomalyScorer

# The scorer holds a batch x patches x bank distance matrix; 2**26 floats (256 MB) per batch
# keeps scoring within a laptop's memory for any bank size.
DISTANCE_BUDGET = 2**26


def scoring_batch_size(scorer: AnomalyScorer, requested: int) -> int:
    patches = scorer.extractor.grid[0] * scorer.extractor.grid[1]
    return max(1, min(requested, DISTANCE_BUDGET // max(1, patches * scorer.bank.shape[0])))


@torch.no_grad()
def score_loader(scorer: AnomalyScorer, loader: Any, device: torch.device, desc: str = "score",
                 maps: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(normalised scores, raw scores, labels, normalised maps or None) for every image of `loader`."""
    scorer.eval()
    scores, raws, labels, all_maps = [], [], [], []
    for images, batch_labels in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        raw, raw_maps = scorer.raw(images.to(device))
        raws.append(raw.cpu())
        scores.append(scorer.normalise(raw).cpu())
        labels.append(batch_labels)
        if maps:
            all_maps.append(scorer.normalise(raw_maps).cpu())
    return (torch.cat(scores).numpy(), torch.cat(raws).numpy(), torch.cat(labels).numpy(),
            torch.cat(all_maps).numpy() if maps else None)


def anomaly_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str], good_label: int,
                    uncertain_band: float = 0.0) -> dict[str, Any]:
    """Image-level metrics of normalised scores (defective when above 0.5): AUROC, F1, precision,
    recall, accuracy, the confusion matrix (rows true good/defective, columns predicted), the
    'uncertain' count and, per defect class, its recall."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    defect = labels != good_label
    flagged = is_defective(scores)
    tp, fp = int((flagged & defect).sum()), int((flagged & ~defect).sum())
    fn = int((~flagged & defect).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if defect.any() else None
    good_correct = float((~flagged[~defect]).mean()) if (~defect).any() else None
    per_class = {}
    for label, name in enumerate(class_names):
        members = labels == label
        if label != good_label and members.any():
            per_class[name] = {"recall": float(flagged[members].mean()), "support": int(members.sum())}
    return {
        "auroc": float(roc_auc_score(defect, scores)) if 0 < defect.sum() < len(defect) else None,
        "f1": f1,
        "precision": precision if defect.any() else None,
        "recall": recall,
        "accuracy": float((flagged == defect).mean()) if len(scores) else None,
        "balanced_accuracy": (good_correct + recall) / 2 if recall is not None and good_correct is not None else None,
        "false_positive_rate": None if good_correct is None else 1 - good_correct,
        "threshold": THRESHOLD,
        "uncertain": int(sum(label == "uncertain" for label in anomaly_labels(scores, uncertain_band))),
        "num_samples": int(len(scores)),
        "num_good": int((~defect).sum()),
        "num_defective": int(defect.sum()),
        "confusion_matrix": confusion_matrix(defect, flagged, labels=[False, True]).tolist(),
        "per_defect_class": per_class,
    }


def add_intervals(metrics: dict[str, Any], scores: np.ndarray, labels: np.ndarray, good_label: int,
                  resamples: int, confidence: float, seed: int = 0) -> dict[str, Any]:
    """`metrics` with percentile-bootstrap intervals (stratified by good/defective) under "ci":
    auroc, f1, recall (sensitivity), precision (ppv), specificity, from the evaluation layer."""
    from vision_ft.evaluation.bootstrap import bootstrap_metrics

    defect = (np.asarray(labels) != good_label).astype(np.int64)
    if resamples <= 0 or defect.min() == defect.max():
        return metrics  # no interval without both good and defective parts
    scores = np.asarray(scores, dtype=np.float64)
    intervals = bootstrap_metrics(defect, np.stack([1 - scores, scores], axis=1), is_defective(scores).astype(np.int64),
                                  positive=1, n_resamples=resamples, confidence=confidence, seed=seed)
    names = {"auroc": "auroc", "f1": "f1", "sensitivity": "recall", "ppv": "precision", "specificity": "specificity"}
    metrics["ci"] = {ours: intervals[theirs] for theirs, ours in names.items() if theirs in intervals}
    metrics["ci_confidence"] = confidence
    return metrics


def format_anomaly_summary(metrics: dict[str, Any]) -> str:
    """`auroc 0.912  f1 0.850 ...` for logs and the CLI."""
    parts = []
    for key in ("auroc", "f1", "precision", "recall", "false_positive_rate"):
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{key} {value:.4f}")
    parts.append(f"({metrics['num_good']} good, {metrics['num_defective']} defective)")
    return "  ".join(parts)
