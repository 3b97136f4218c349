"""Single-label classification: softmax over classes, cross-entropy, accuracy / macro-F1 / AUROC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vision_ft.data.discover import DatasetIndex, Sample, discover
from vision_ft.data.loaders import class_counts
from vision_ft.data.split import make_splits
from vision_ft.errors import VisionFTError
from vision_ft.inference import evaluate_probs
from vision_ft.plots import plot_confusion_matrix
from vision_ft.tasks.base import LossFn, Task


class ClassificationTask(Task):
    kind = "classification"
    metrics = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")

    @property
    def default_metric(self) -> str:  # type: ignore[override]
        from vision_ft.auto_config import auto_metric

        return auto_metric(len(self.names))

    def discover(self, source: Path, known: list[str] | None = None) -> DatasetIndex:
        index = discover(source)
        if known is not None:
            unknown = sorted(set(index.class_names) - set(known))
            if unknown:
                raise VisionFTError(
                    f"{source} has classes the run was not trained on: {', '.join(unknown)}; the run knows {', '.join(known)}"
                )
            # The folder's class indices onto the run's, by class name.
            to_run = {i: known.index(name) for i, name in enumerate(index.class_names)}
            index.samples = [Sample(s.path, to_run[s.label]) for s in index.samples]
            if index.presplit:
                index.presplit = {k: [Sample(s.path, to_run[s.label]) for s in v] for k, v in index.presplit.items()}
            index.class_names = list(known)
        self.names = list(index.class_names)
        return index

    def split(self, index: DatasetIndex) -> dict[str, list[Sample]]:
        data = self.config.data
        return make_splits(index, data.val_fraction, data.test_fraction, data.split_seed, data.allow_group_leak)

    def describe_split(self, splits: dict[str, list[Sample]]) -> str:
        parts = []
        for name, samples in splits.items():
            counts = class_counts(samples, len(self.names))
            parts.append(f"{name} {len(samples)} ({', '.join(f'{c}:{n}' for c, n in zip(self.names, counts))})")
        return "; ".join(parts)

    def loss(self, train: list[Sample], device: torch.device) -> LossFn:
        weight = None
        if self.config.data.balance == "loss_weights":
            counts = torch.tensor(class_counts(train, len(self.names)), dtype=torch.float32)
            weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.config.train.label_smoothing)

    def batch_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
        return int((outputs.detach().argmax(1) == targets).sum())

    def scores(self, outputs: torch.Tensor) -> np.ndarray:
        return torch.softmax(outputs.float(), dim=1).cpu().numpy()

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        return evaluate_probs(scores, np.asarray(targets, dtype=np.int64), self.names, self.config.train.label_smoothing)

    def plot(self, split: str, scores: np.ndarray, targets: np.ndarray, metrics: dict[str, Any],
             folder: Path, title: str) -> None:
        plot_confusion_matrix(metrics["confusion_matrix"], self.names, folder / f"confusion_{split}.png", title)

    def report_lines(self, metrics: dict[str, Any]) -> list[str]:
        from vision_ft.report import classification_table

        return classification_table(metrics)
