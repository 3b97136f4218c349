"""Regression: one linear output per target, trained on standardised targets, reported in original units.

Targets are standardised with the training split's mean and standard deviation (so the loss
and the learning rate do not depend on the targets' units); scores, metrics, predictions and the
ONNX model's outputs are in the original units (the ONNX graph ends in the de-standardisation).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from vision_ft.data.discover import DatasetIndex, Sample
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.task_intervals import bootstrap_task_metrics, regression_resampled
from vision_ft.tasks.base import LossFn, Task
from vision_ft.tasks.manifest import read_regression_manifest
from vision_ft.tasks.plots import plot_regression
from vision_ft.tasks.splits import regression_split, split_index

_LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss}


class Destandardise(nn.Module):
    """outputs * std + mean, per target: the last step of the exported regressor."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image) * self.std + self.mean


def regression_metrics(predicted: np.ndarray, true: np.ndarray, names: list[str]) -> dict[str, Any]:
    """RMSE, MAE, R², Pearson and Spearman per target; the top-level values average the targets."""
    per_target = {}
    for j, name in enumerate(names):
        p, t = predicted[:, j], true[:, j]
        error = p - t
        variance = float(((t - t.mean()) ** 2).sum())
        constant = np.ptp(p) == 0 or np.ptp(t) == 0  # correlation is undefined for a constant side
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_target[name] = {
                "rmse": float(np.sqrt((error**2).mean())),
                "mae": float(np.abs(error).mean()),
                "r2": None if variance == 0 else float(1 - (error**2).sum() / variance),
                "pearson": None if constant else float(stats.pearsonr(p, t).statistic),
                "spearman": None if constant else float(stats.spearmanr(p, t).statistic),
            }
    summary: dict[str, Any] = {}
    for key in ("rmse", "mae", "r2", "pearson", "spearman"):
        values = [row[key] for row in per_target.values() if row[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
    return {**summary, "num_samples": int(len(true)), "per_target": per_target}


class RegressionTask(Task):
    kind = "regression"
    default_metric = "rmse"
    metrics = ("rmse", "mae", "r2", "pearson", "spearman")
    lower_is_better_metrics = frozenset({"loss", "rmse", "mae"})
    onnx_output_name = "values"

    def __init__(self, config: Any, names: list[str] | None = None) -> None:
        super().__init__(config, names)
        self.mean: list[float] = [0.0] * len(self.names)
        self.std: list[float] = [1.0] * len(self.names)

    def discover(self, source: Path, known: list[str] | None = None) -> DatasetIndex:
        columns = list(known) if known is not None else self.config.data.target_columns
        index = read_regression_manifest(Path(source), columns)
        self.names = list(index.class_names)
        return index

    def split(self, index: DatasetIndex) -> dict[str, list[Sample]]:
        data = self.config.data
        return split_index(index, regression_split, data.val_fraction, data.test_fraction, data.split_seed,
                           data.allow_group_leak)

    def fit(self, train: list[Sample]) -> None:
        if not train:
            return
        values = np.asarray([s.target for s in train], dtype=np.float64)
        self.mean = values.mean(axis=0).tolist()
        # A constant target keeps std 1: nothing to learn, but nothing divides by zero either.
        self.std = [float(s) if s > 0 else 1.0 for s in values.std(axis=0)]

    def _standardise(self, targets: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=targets.dtype, device=targets.device)
        std = torch.tensor(self.std, dtype=targets.dtype, device=targets.device)
        return (targets - mean) / std

    def loss(self, train: list[Sample], device: torch.device) -> LossFn:
        criterion = _LOSSES[self.config.train.regression_loss]()
        return lambda outputs, targets: criterion(outputs, self._standardise(targets.float()))

    def scores(self, outputs: torch.Tensor) -> np.ndarray:
        values = outputs.float().cpu().numpy().astype(np.float64)
        return values * np.asarray(self.std) + np.asarray(self.mean)

    def intervals(self, scores: np.ndarray, targets: np.ndarray, groups: list[str] | None, settings: Any,
                  seed: int) -> dict[str, dict[str, float | None]]:
        if settings.bootstrap_resamples <= 0 or len(targets) == 0:
            return {}
        true = np.asarray(targets, dtype=np.float64)
        return bootstrap_task_metrics(lambda w: regression_resampled(w, scores, true), len(true), groups,
                                      settings.bootstrap_resamples, settings.confidence, seed)

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        metrics = regression_metrics(scores, np.asarray(targets, dtype=np.float64), self.names)
        outputs = torch.from_numpy((scores - np.asarray(self.mean)) / np.asarray(self.std))
        criterion = _LOSSES[self.config.train.regression_loss]()
        standardised = (torch.from_numpy(np.asarray(targets, dtype=np.float64)) - torch.tensor(self.mean)) / torch.tensor(self.std)
        metrics["loss"] = float(criterion(outputs, standardised))
        return metrics

    def plot(self, split: str, scores: np.ndarray, targets: np.ndarray, metrics: dict[str, Any],
             folder: Path, title: str) -> None:
        plot_regression(scores, np.asarray(targets, dtype=np.float64), self.names, folder, split, title)

    def export_head(self, model: nn.Module) -> nn.Module:
        return Destandardise(model, self.mean, self.std).eval()

    def metadata(self) -> dict[str, Any]:
        return {"target_mean": self.mean, "target_std": self.std, "loss": self.config.train.regression_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"target_mean": self.mean, "target_std": self.std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean, std = [float(v) for v in state["target_mean"]], [float(v) for v in state["target_std"]]
        if len(mean) != len(self.names) or len(std) != len(self.names) or min(std) <= 0:
            raise VisionFTError(f"target statistics {mean} / {std} do not fit the targets {self.names}")
        self.mean, self.std = mean, std
