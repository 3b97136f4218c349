"""The decision threshold on raw anomaly scores, and a sentence saying why it was chosen.

With defects in the validation split the threshold maximises F1 on it, or is the highest one
that still catches `target_recall` of the defects (fewest false alarms at that recall). With good
parts only, it is a high quantile of their scores: the fraction of good parts expected to be
flagged is then about 1 - quantile. Thresholds sit halfway between two neighbouring validation
scores, never on one, so the validation decisions do not hinge on rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vision_ft.config import AnomalyConfig
from vision_ft.errors import VisionFTError


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float  # raw score units; above it a part is defective
    scale: float  # raw units per unit of the normalisation's logit
    rule: str  # best_f1, target_recall or good_quantile
    reason: str


def _candidates(scores: np.ndarray) -> np.ndarray:
    values = np.unique(scores)
    below = values[0] - max(1e-6, 1e-3 * abs(values[0]))
    return np.concatenate([[below], (values[:-1] + values[1:]) / 2, [values[-1] + max(1e-6, 1e-3 * abs(values[-1]))]])


def _counts(scores: np.ndarray, defect: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) for 'defective when score > t', per threshold."""
    flagged = scores[None, :] > thresholds[:, None]
    return (flagged & defect).sum(1), (flagged & ~defect).sum(1)


def normalisation_scale(good_scores: np.ndarray, threshold: float) -> float:
    """The spread of good parts' scores: one unit of it moves the normalised score from 0.5 to 0.73."""
    spread = float(np.std(good_scores)) if len(good_scores) > 1 else 0.0
    return spread if spread > 0 else max(abs(threshold) * 0.1, 1e-6)


def choose_threshold(scores: np.ndarray, defect: np.ndarray, config: AnomalyConfig) -> ThresholdChoice:
    """The threshold for raw validation `scores` (`defect` marks defective parts)."""
    scores = np.asarray(scores, dtype=np.float64)
    defect = np.asarray(defect, dtype=bool)
    good = scores[~defect]
    if not len(good):
        raise VisionFTError("the validation split holds no good parts to set the anomaly threshold on; "
                            "set data.val_fraction above 0 or add good images to the val split")
    if not defect.any():
        q = config.good_quantile
        threshold = float(np.quantile(good, q))
        flagged = int((good > threshold).sum())
        reason = (f"the validation split has {len(good)} good parts and no defects, so the threshold is their "
                  f"{q:g} quantile (raw {threshold:.4g}; {flagged} of {len(good)} flagged, about {1 - q:.1%} of good "
                  "parts expected flagged); recall on defects is unknown until a split with defects is evaluated")
        return ThresholdChoice(threshold, normalisation_scale(good, threshold), "good_quantile", reason)
    thresholds = _candidates(scores)
    tp, fp = _counts(scores, defect, thresholds)
    positives = int(defect.sum())
    recall = tp / positives
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    if config.threshold_rule == "target_recall":
        # The highest threshold that reaches the target: fewest good parts flagged.
        reaching = np.flatnonzero(recall >= config.target_recall)
        best = int(reaching[-1])
        why = f"the highest threshold catching at least {config.target_recall:.0%} of the defects"
    else:
        best = int(np.flatnonzero(f1 == f1.max())[-1])  # ties: the higher threshold, fewer false alarms
        why = "the threshold with the best F1"
    threshold = float(thresholds[best])
    reason = (f"the validation split has {len(good)} good and {positives} defective parts; {why}: raw {threshold:.4g}, "
              f"recall {recall[best]:.3f}, precision {precision[best]:.3f}, F1 {f1[best]:.3f}, "
              f"{int(fp[best])} of {len(good)} good parts flagged")
    return ThresholdChoice(threshold, normalisation_scale(good, threshold), config.threshold_rule, reason)
