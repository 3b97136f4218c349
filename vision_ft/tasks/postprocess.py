"""What a model's output means, per task: the numpy half every path shares.

The torch tasks (`vision_ft.tasks.classification` ...) and the torch-free runtime both turn raw
outputs into scores and prediction tables through these functions, so a run folder and its ONNX
model answer alike. Imports only numpy.

* classification: the ONNX model outputs logits; scores are their softmax; the label is the argmax.
* multilabel: the ONNX model ends in a sigmoid; scores are per-label probabilities; the labels
  of an image are those at or above their per-label threshold (chosen on the validation split).
* regression: the ONNX model outputs values in the targets' original units (the
  de-standardisation is inside the graph); scores are those values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

TASK_KINDS = ("classification", "multilabel", "regression")
LABEL_SEPARATOR = ";"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 (stable for large logits); a row with a non-finite
    logit comes out all NaN, so it can never look like a confident answer."""
    values = logits.astype(np.float64)
    finite = np.isfinite(values).all(axis=1, keepdims=True)
    values = np.where(finite, values, 0.0)
    exp = np.exp(values - values.max(axis=1, keepdims=True))
    return np.where(finite, exp / exp.sum(axis=1, keepdims=True), np.nan)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float64, without overflow for large |logits|."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def onnx_outputs_to_scores(kind: str, outputs: np.ndarray) -> np.ndarray:
    """Scores from what the exported graph outputs (see the module docstring)."""
    if kind == "classification":
        return softmax(outputs)
    return np.asarray(outputs, dtype=np.float64)


def label_sets(probabilities: np.ndarray, names: Sequence[str], thresholds: Sequence[float]) -> list[list[str]]:
    """Per image, the labels whose probability reaches their threshold (in `names` order)."""
    above = np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)[None, :]
    return [[names[j] for j in np.flatnonzero(row)] for row in above]


def prediction_table(
    kind: str,
    paths: Sequence[Path | str],
    scores: np.ndarray,
    names: Sequence[str],
    top_k: int = 3,
    thresholds: Sequence[float] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """CSV header and rows for `vision-ft predict`, the same for a run folder and an ONNX model.

    classification: path, label, score, top-k labels and scores; multilabel: path, labels
    (``;``-separated, empty when none), then one probability column per label; regression:
    path, then one value column per target.
    """
    if kind == "multilabel":
        sets = label_sets(scores, names, thresholds if thresholds is not None else [0.5] * len(names))
        header = ["path", "labels", *[f"score_{name}" for name in names]]
        return header, [[str(p), LABEL_SEPARATOR.join(s), *[f"{v:.6f}" for v in row]]
                        for p, s, row in zip(paths, sets, scores)]
    if kind == "regression":
        return ["path", *names], [[str(p), *[f"{v:.6g}" for v in row]] for p, row in zip(paths, scores)]
    top_k = max(1, min(top_k, len(names)))
    header = ["path", "label", "score"]
    for k in range(1, top_k + 1):
        header += [f"top{k}_label", f"top{k}_score"]
    rows = []
    for path, p in zip(paths, scores):
        order = np.argsort(-p)[:top_k]
        row = [str(path), names[order[0]], f"{p[order[0]]:.6f}"]
        for idx in order:
            row += [names[idx], f"{p[idx]:.6f}"]
        rows.append(row)
    return header, rows


def task_summary(kind: str) -> str:
    """One line describing a model's outputs, for model descriptions and reports."""
    if kind == "multilabel":
        return "multi-label classifier (sigmoid probabilities, per-label thresholds)"
    if kind == "regression":
        return "regressor (values in the targets' units)"
    return "classifier"
