"""Predictions of a trained run's torch model on files, folders, arrays or Pillow images
(`Run.predict` and `vision-ft predict RUN`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.data.dataset import ImageDataset
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.transforms import build_transforms
from vision_ft.predict import collect_images
from vision_ft.run_model import LoadedRun
from vision_ft.decision import DecisionRule
from vision_ft.evaluation.run_evaluation import load_decision_rule
from vision_ft.runtime import ERROR, NON_FINITE, Prediction, check_threshold
from vision_ft.train import predict_logits


def image_sources(images: Any) -> list[Any]:
    """An image file or folder becomes its sorted image paths; a list passes through (paths made Path)."""
    if isinstance(images, (str, Path)):
        return list(collect_images(Path(images)))
    return [Path(item) if isinstance(item, str) else item for item in images]


def predict_probabilities(loaded: LoadedRun, images: Any, batch_size: int | None = None) -> np.ndarray:
    """Softmax probabilities (N x classes) of `loaded.model` for `images`, decoded as in training."""
    sources = image_sources(images)
    if not sources:
        return np.zeros((0, len(loaded.class_names)), dtype=np.float32)
    device = next(loaded.model.parameters()).device
    cfg = loaded.config
    # ImageDataset decodes with load_image, which takes paths, arrays and Pillow images alike.
    dataset = ImageDataset([Sample(source, 0) for source in sources],
                           build_transforms([], loaded.mean, loaded.std, train=False),
                           cfg.data.channels, cfg.data.image_size, max_pixels=cfg.data.max_pixels)
    files_only = all(isinstance(source, Path) for source in sources)
    # Worker processes would pickle in-memory images for nothing; files are decoded in parallel.
    loader = build_loader(dataset, batch_size or cfg.train.batch_size, train=False,
                          workers=cfg.data.workers if files_only else 0)
    logits, _ = predict_logits(loaded.model, loader, device)
    # The run's temperature (decision.json), through the same numpy function as the ONNX runtime.
    return load_decision_rule(loaded.run.root, loaded.class_names).probabilities(logits)


def predictions(probs: np.ndarray, class_names: Sequence[str], threshold: float | None = None,
                rule: DecisionRule | None = None) -> list[Prediction]:
    """A Prediction per row of `probs`, labelled by `rule` (the run's operating thresholds); below
    `threshold` the label is UNCERTAIN (as the ONNX runtime does)."""
    check_threshold(threshold)
    labels = (rule or DecisionRule()).labels(probs, list(class_names), reject_below=threshold)
    result = []
    for row, label in zip(probs, labels):
        if not np.all(np.isfinite(row)):  # NaN never becomes a label, nor passes a threshold
            result.append(Prediction(ERROR, float("nan"), "", row, NON_FINITE))
            continue
        best = int(np.argmax(row))
        result.append(Prediction(label, float(row[best]), class_names[best], row))
    return result
