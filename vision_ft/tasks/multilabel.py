"""Multi-label classification: one sigmoid per label, BCE, per-label thresholds chosen on val.

Metrics: per-label AUROC, average precision and F1 at the label's threshold; their macro means
(macro-AUROC, mAP, macro-F1) and micro versions (all labels pooled). Thresholds maximise each
label's F1 on the validation split and are then applied unchanged to the test split, to
`predict` and, through the ONNX metadata, to the runtime.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score
from torch import nn

from vision_ft.data.discover import DatasetIndex, Sample
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.task_intervals import bootstrap_task_metrics, multilabel_resampled
from vision_ft.tasks.base import LossFn, Task
from vision_ft.tasks.manifest import read_multilabel_manifest
from vision_ft.tasks.plots import plot_precision_recall
from vision_ft.tasks.splits import multilabel_split, split_index

DEFAULT_THRESHOLD = 0.5
# pos_weight=auto caps negatives/positives: a label seen twice in 5000 images would otherwise
# weigh 2500x and make the loss swing wildly.
MAX_AUTO_POS_WEIGHT = 100.0


def best_f1_threshold(probabilities: np.ndarray, positives: np.ndarray) -> float:
    """The probability cut with the highest F1 for one label (0.5 without positives and negatives)."""
    if positives.min() == positives.max():
        return DEFAULT_THRESHOLD
    precision, recall, cuts = precision_recall_curve(positives, probabilities)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(cuts[int(np.argmax(f1))])


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, names: list[str],
                       thresholds: list[float]) -> dict[str, Any]:
    predicted = probabilities >= np.asarray(thresholds)[None, :]
    per_label: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels absent from a small split: their metrics are None
        for j, name in enumerate(names):
            both = targets[:, j].min() != targets[:, j].max()
            per_label[name] = {
                "auroc": float(roc_auc_score(targets[:, j], probabilities[:, j])) if both else None,
                "ap": float(average_precision_score(targets[:, j], probabilities[:, j])) if targets[:, j].any() else None,
                "f1": float(f1_score(targets[:, j], predicted[:, j], zero_division=0)),
                "threshold": float(thresholds[j]),
                "support": int(targets[:, j].sum()),
            }
        pooled = targets.min() != targets.max()
        micro_auroc = float(roc_auc_score(targets.ravel(), probabilities.ravel())) if pooled else None
        micro_ap = float(average_precision_score(targets.ravel(), probabilities.ravel())) if targets.any() else None
        micro_f1 = float(f1_score(targets.ravel(), predicted.ravel(), zero_division=0))

    def mean(key: str) -> float | None:
        values = [row[key] for row in per_label.values() if row[key] is not None]
        return float(np.mean(values)) if values else None

    return {"macro_auroc": mean("auroc"), "map": mean("ap"), "macro_f1": mean("f1"), "micro_auroc": micro_auroc,
            "micro_ap": micro_ap, "micro_f1": micro_f1, "num_samples": int(len(targets)), "per_label": per_label}


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class MultilabelTask(Task):
    kind = "multilabel"
    default_metric = "macro_auroc"
    metrics = ("macro_auroc", "map", "macro_f1", "micro_auroc", "micro_f1")
    onnx_output_name = "probabilities"

    def __init__(self, config: Any, names: list[str] | None = None) -> None:
        super().__init__(config, names)
        self.thresholds: list[float] = [DEFAULT_THRESHOLD] * len(self.names)

    def discover(self, source: Path, known: list[str] | None = None) -> DatasetIndex:
        index = read_multilabel_manifest(Path(source), self.config.data.label_columns, known)
        self.names = list(index.class_names)
        if len(self.thresholds) != len(self.names):
            self.thresholds = [DEFAULT_THRESHOLD] * len(self.names)
        return index

    def split(self, index: DatasetIndex) -> dict[str, list[Sample]]:
        data = self.config.data
        return split_index(index, multilabel_split, data.val_fraction, data.test_fraction, data.split_seed,
                           data.allow_group_leak)

    def describe_split(self, splits: dict[str, list[Sample]]) -> str:
        parts = []
        for name, samples in splits.items():
            counts = np.sum([s.target for s in samples], axis=0).astype(int) if samples else [0] * len(self.names)
            parts.append(f"{name} {len(samples)} ({', '.join(f'{n}:{c}' for n, c in zip(self.names, counts))})")
        return "; ".join(parts)

    def _pos_weight(self, train: list[Sample]) -> list[float] | None:
        setting = self.config.train.pos_weight
        if setting == "none":
            return None
        if setting == "auto":
            positives = np.sum([s.target for s in train], axis=0)
            negatives = len(train) - positives
            return np.clip(negatives / np.clip(positives, 1, None), 1.0 / MAX_AUTO_POS_WEIGHT, MAX_AUTO_POS_WEIGHT).tolist()
        if len(setting) != len(self.names):
            raise VisionFTError(
                f"train.pos_weight has {len(setting)} values for {len(self.names)} labels ({', '.join(self.names)}); "
                "give one per label, or auto"
            )
        return [float(v) for v in setting]

    def loss(self, train: list[Sample], device: torch.device) -> LossFn:
        weights = self._pos_weight(train)
        pos_weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
        # Targets arrive as float32 0/1 vectors (ImageDataset); the module itself is returned so
        # the loop can log its pos_weight.
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def scores(self, outputs: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(outputs.float()).cpu().numpy().astype(np.float64)

    def calibrate(self, val_scores: np.ndarray, val_targets: np.ndarray) -> None:
        self.thresholds = [best_f1_threshold(val_scores[:, j], val_targets[:, j]) for j in range(len(self.names))]

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        targets = np.asarray(targets, dtype=np.float64)
        metrics = multilabel_metrics(scores, targets, self.names, self.thresholds)
        clipped = np.clip(scores, 1e-7, 1 - 1e-7)
        metrics["loss"] = float(-(targets * np.log(clipped) + (1 - targets) * np.log(1 - clipped)).mean())
        return metrics

    def intervals(self, scores: np.ndarray, targets: np.ndarray, groups: list[str] | None, settings: Any,
                  seed: int) -> dict[str, dict[str, float | None]]:
        if settings.bootstrap_resamples <= 0 or len(targets) == 0:
            return {}
        truth = np.asarray(targets, dtype=np.float64)
        predicted = scores >= np.asarray(self.thresholds)[None, :]
        return bootstrap_task_metrics(lambda w: multilabel_resampled(w, truth, scores, predicted), len(truth),
                                      groups, settings.bootstrap_resamples, settings.confidence, seed)

    def plot(self, split: str, scores: np.ndarray, targets: np.ndarray, metrics: dict[str, Any],
             folder: Path, title: str) -> None:
        plot_precision_recall(scores, np.asarray(targets), self.names, self.thresholds,
                              folder / f"precision_recall_{split}.png", title)

    def report_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = super().report_lines(metrics)
        if "test" in metrics:
            lines += ["", "## Per label (test; thresholds chosen on val)", "",
                      "| label | AUROC | AP | F1 | threshold | positives |", "|---|---|---|---|---|---|"]
            for name, row in metrics["test"]["per_label"].items():
                lines.append(f"| {name} | {_show(row['auroc'])} | {_show(row['ap'])} | {row['f1']:.3f} "
                             f"| {row['threshold']:.3f} | {row['support']} |")
        return lines

    def export_head(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(model, nn.Sigmoid()).eval()

    def metadata(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        thresholds = [float(v) for v in state["thresholds"]]
        if len(thresholds) != len(self.names) or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise VisionFTError(f"thresholds {thresholds} do not fit the labels {self.names}")
        self.thresholds = thresholds
