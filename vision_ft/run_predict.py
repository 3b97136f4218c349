"""Scores of a trained run's torch model for files, folders, arrays or Pillow images
(`Run.predict_proba`, `Run.predict` and `vision-ft predict RUN`), through `inference.infer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision_ft.data.discover import Sample
from vision_ft.evaluation.run_evaluation import load_decision_rule
from vision_ft.inference import eval_loader, infer
from vision_ft.predict import collect_images
from vision_ft.run_model import LoadedRun


def image_sources(images: Any) -> list[Any]:
    """An image file or folder becomes its sorted image paths; a list passes through (paths made Path)."""
    if isinstance(images, (str, Path)):
        return list(collect_images(Path(images)))
    return [Path(item) if isinstance(item, str) else item for item in images]


def predict_probabilities(loaded: LoadedRun, images: Any, batch_size: int | None = None) -> np.ndarray:
    """Scores (N x outputs) of `loaded.model` for `images`, decoded as in training: softmax
    probabilities (with the run's temperature), per-label sigmoid probabilities or values in the
    targets' units, by the run's task."""
    sources = image_sources(images)
    if not sources:
        return np.zeros((0, len(loaded.class_names)), dtype=np.float32)
    files_only = all(isinstance(source, Path) for source in sources)
    # ImageDataset decodes with load_image, which takes paths, arrays and Pillow images alike.
    # Worker processes would pickle in-memory images for nothing; files are decoded in parallel.
    loader = eval_loader([Sample(source, 0) for source in sources], loaded.config, loaded.mean, loaded.std,
                         batch_size, workers=None if files_only else 0)
    logits = infer(loaded.model, loader, progress="predict", tta=loaded.config.eval.tta).logits
    if loaded.task.kind != "classification":
        return loaded.task.scores(torch.from_numpy(logits))
    # The run's temperature (decision.json), through the same numpy function as the ONNX runtime.
    return load_decision_rule(loaded.run.root, loaded.class_names).probabilities(logits)
