"""Bootstrap confidence intervals for multi-label and regression metrics.

The same resampling as the classification intervals (`vision_ft.evaluation.bootstrap`): each
resample is a row of weights, how often each image (or, with groups, each patient's images) was
drawn, so every metric is a weighted sum over the images instead of a Python loop over
resamples. Images are drawn without class strata here: a multi-label image belongs to several
labels at once and a regression target has no classes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vision_ft.evaluation.bootstrap import (_CHUNK, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, percentile_intervals,
                                            resample_weights, weighted_auroc)

Interval = dict[str, float | None]


def _weighted_f1(weights: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, false negatives) per weight row, for 0/1 vectors."""
    tp = weights @ (truth & predicted).astype(np.float32)
    fp = weights @ (~truth & predicted).astype(np.float32)
    fn = weights @ (truth & ~predicted).astype(np.float32)
    return tp.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 0.0)  # sklearn: 0 when empty


def _mean_over_present(values: list[np.ndarray]) -> np.ndarray:
    """Per weight row, the mean of the finite values among `values` (a resample may lack a label's
    positives, or a target's spread); NaN where none is finite."""
    stacked = np.stack(values)
    present = np.isfinite(stacked)
    total = np.where(present, stacked, 0).sum(axis=0)
    return np.where(present.any(axis=0), total / np.maximum(present.sum(axis=0), 1), np.nan)


def multilabel_resampled(weights: np.ndarray, targets: np.ndarray, probabilities: np.ndarray,
                         predicted: np.ndarray) -> dict[str, np.ndarray]:
    """macro/micro AUROC and F1 for each weight row (R x N) of N images x L labels; `predicted`
    (N x L, bool) holds the decisions, e.g. probabilities at or above each label's threshold."""
    truth = targets.astype(bool)
    predicted = np.asarray(predicted, dtype=bool)
    aurocs, f1s = [], []
    tp_all = fp_all = fn_all = 0.0
    for j in range(truth.shape[1]):
        if truth[:, j].any() and not truth[:, j].all():
            aurocs.append(weighted_auroc(weights, truth[:, j], probabilities[:, j]))
        tp, fp, fn = _weighted_f1(weights, truth[:, j], predicted[:, j])
        f1s.append(_f1(tp, fp, fn))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    pooled = np.repeat(weights, truth.shape[1], axis=1)  # image weights, once per label
    flat_truth = truth.ravel()
    result = {"macro_f1": np.mean(f1s, axis=0), "micro_f1": _f1(tp_all, fp_all, fn_all)}
    if aurocs:
        result["macro_auroc"] = _mean_over_present(aurocs)
    if flat_truth.any() and not flat_truth.all():
        result["micro_auroc"] = weighted_auroc(pooled, flat_truth, probabilities.ravel())
    return result


def regression_resampled(weights: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """RMSE, MAE, R² and Pearson's r for each weight row, averaged over the targets like the point values."""
    total = weights.sum(axis=1, keepdims=True).astype(np.float64)
    rows: dict[str, list[np.ndarray]] = {"rmse": [], "mae": [], "r2": [], "pearson": []}
    for j in range(true.shape[1]):
        p, t = predicted[:, j].astype(np.float64), true[:, j].astype(np.float64)
        error = p - t
        mean_t = (weights @ t)[:, None] / total
        mean_p = (weights @ p)[:, None] / total
        sse = weights @ error**2
        sst = (weights * (t[None, :] - mean_t) ** 2).sum(axis=1)
        spp = (weights * (p[None, :] - mean_p) ** 2).sum(axis=1)
        spt = (weights * (p[None, :] - mean_p) * (t[None, :] - mean_t)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rows["rmse"].append(np.sqrt(sse / total[:, 0]))
            rows["mae"].append((weights @ np.abs(error)) / total[:, 0])
            rows["r2"].append(np.where(sst > 0, 1 - sse / sst, np.nan))
            rows["pearson"].append(np.where((spp > 0) & (sst > 0), spt / np.sqrt(spp * sst), np.nan))
    return {name: _mean_over_present(values) for name, values in rows.items()}


def bootstrap_task_metrics(
    metric_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_images: int,
    groups: Sequence[str] | np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Interval]:
    """{metric: {"value", "low", "high"}}: `metric_rows(weights)` evaluated on all-ones weights
    (the point estimate) and on `n_resamples` resamples of the images (whole groups when given)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    point = metric_rows(np.ones((1, n_images), np.float32))
    rng = np.random.default_rng(seed)
    strata = np.zeros(n_images, dtype=np.int64)  # one stratum: draw from all images (or groups)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in point}
    for start in range(0, n_resamples, _CHUNK):
        weights = resample_weights(strata, None if groups is None else np.asarray(groups),
                                   min(_CHUNK, n_resamples - start), rng)
        for name, values in metric_rows(weights).items():
            chunks[name].append(values)
    return percentile_intervals(point, chunks, confidence)
