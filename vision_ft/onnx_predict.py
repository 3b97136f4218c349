"""`vision-ft predict model.onnx PATH`: label images with an exported model, through the
torch-free runtime; the same CSV as predictions of a run folder (`predict.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from vision_ft.predict import collect_images, prediction_header, prediction_rows
from vision_ft.runtime import DEFAULT_BATCH_SIZE, check_threshold, load_model


def is_onnx_model(source: Path) -> bool:
    """A model file (for the runtime) rather than a run folder."""
    return source.suffix.lower() == ".onnx" or source.is_file()


def predict_onnx(model_path: Path, path: Path, top_k: int = 3, batch_size: int | None = None,
                 threshold: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of predictions of the exported model `model_path` on `path`."""
    check_threshold(threshold)
    model = load_model(model_path)
    images = collect_images(path)
    top_k = max(1, min(top_k, len(model.class_names)))
    with tqdm(total=len(images), desc="predict", unit="img", leave=False, disable=not sys.stderr.isatty()) as bar:
        probs = model.predict_proba(images, batch_size or DEFAULT_BATCH_SIZE, progress=bar.update)
    return prediction_header(top_k), prediction_rows(images, probs, model.class_names, top_k, threshold)
