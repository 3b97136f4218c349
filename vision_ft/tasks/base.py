"""The Task: everything that differs between classification, multi-label and regression.

The loop, evaluation, prediction, export and report ask the run's Task instead of branching on
its kind: how to read the data and split it, the loss, raw outputs -> scores, metrics and the
early-stopping metric, plots, prediction tables, the head the ONNX model ends in, and the state
(thresholds, target statistics) saved beside the run in ``task.json``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vision_ft.data.discover import DatasetIndex, Sample
from vision_ft.errors import VisionFTError
from vision_ft.tasks.postprocess import prediction_table

TASK_FILE = "task.json"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Task(ABC):
    kind: str = ""
    default_metric: str = ""
    metrics: tuple[str, ...] = ()  # the metrics early stopping may watch (besides "loss")
    lower_is_better_metrics: frozenset[str] = frozenset({"loss"})
    onnx_output_name: str = "logits"

    def __init__(self, config: Any, names: list[str] | None = None) -> None:
        self.config = config
        self.names: list[str] = list(names or [])
        metric = config.train.early_stopping.metric
        if metric not in ("auto", "loss", *self.metrics):
            raise VisionFTError(
                f"train.early_stopping.metric={metric} does not apply to task {self.kind}; "
                f"use auto, loss, {', '.join(self.metrics)}"
            )

    # ------------------------------------------------------------------ data

    @abstractmethod
    def discover(self, source: Path, known: list[str] | None = None) -> DatasetIndex:
        """Index the data at `source`; with `known` (a trained run's outputs), check it against them."""

    @abstractmethod
    def split(self, index: DatasetIndex) -> dict[str, list[Sample]]:
        """The train/val/test split of `index` under the config's fractions and seed."""

    def describe_split(self, splits: dict[str, list[Sample]]) -> str:
        return "; ".join(f"{name} {len(samples)}" for name, samples in splits.items())

    # ------------------------------------------------------------------ training

    @property
    def early_stopping_metric(self) -> str:
        metric = self.config.train.early_stopping.metric
        return self.default_metric if metric == "auto" else metric

    def lower_is_better(self, metric: str) -> bool:
        return metric in self.lower_is_better_metrics

    def fit(self, train: list[Sample]) -> None:
        """Learn what the task needs from the training split (target statistics); default none."""

    @abstractmethod
    def loss(self, train: list[Sample], device: torch.device) -> LossFn:
        """The training loss, called as loss(model_outputs, batch_targets)."""

    def batch_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
        """Correct predictions in a batch for the progress bar, or None where that means nothing."""
        return None

    # ------------------------------------------------------------------ evaluation

    @abstractmethod
    def scores(self, outputs: torch.Tensor) -> np.ndarray:
        """Scores in the task's own terms (probabilities, values in original units) from raw outputs."""

    @abstractmethod
    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        """Metrics (and "loss") of `scores` against `targets`."""

    def calibrate(self, val_scores: np.ndarray, val_targets: np.ndarray) -> None:
        """Choose what is chosen on the validation split (multi-label thresholds); default none."""

    def intervals(self, scores: np.ndarray, targets: np.ndarray, groups: list[str] | None, settings: Any,
                  seed: int) -> dict[str, dict[str, float | None]]:
        """Bootstrap confidence intervals of the test metrics ({metric: {value, low, high}}), whole
        groups resampled when `groups` are known; `settings` is the config's eval section."""
        return {}

    def summary_keys(self) -> tuple[str, ...]:
        return ("loss", *self.metrics)

    def plot(self, split: str, scores: np.ndarray, targets: np.ndarray, metrics: dict[str, Any],
             folder: Path, title: str) -> None:
        """The split's plots into `folder`; default none."""

    def report_lines(self, metrics: dict[str, Any]) -> list[str]:
        keys = [k for k in self.metrics]
        lines = ["| split | " + " | ".join(keys) + " | images |", "|---" * (len(keys) + 2) + "|"]
        for split in ("val", "test"):
            if split in metrics:
                values = [_fmt(metrics[split].get(k)) for k in keys]
                lines.append(f"| {split} | " + " | ".join(values) + f" | {metrics[split]['num_samples']} |")
        return lines

    # ------------------------------------------------------------------ deployment

    def export_head(self, model: nn.Module) -> nn.Module:
        """The module whose outputs the ONNX model carries (default: the raw outputs)."""
        return model

    def metadata(self) -> dict[str, Any]:
        """What the runtime needs to read the ONNX outputs (JSON-ready)."""
        return {}

    def prediction_table(self, paths: list[Path], scores: np.ndarray, top_k: int) -> tuple[list[str], list[list[str]]]:
        return prediction_table(self.kind, paths, scores, self.names, top_k, self.metadata().get("thresholds"))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save(self, run_root: Path) -> None:
        state = {"task": self.kind, "names": self.names, **self.state_dict()}
        tmp = run_root / (TASK_FILE + ".partial")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(run_root / TASK_FILE)

    def load(self, run_root: Path) -> None:
        path = run_root / TASK_FILE
        if not path.is_file():
            return
        try:
            self.load_state_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise VisionFTError(f"{path} is malformed ({exc}); restore it or train the run again") from None


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
