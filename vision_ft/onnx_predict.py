"""`vision-ft predict model.onnx PATH`: an exported model's probabilities for image files,
through the torch-free runtime (a run folder's go through `vision_ft.load_run(...).predict_proba`;
both end in the same CSV, `predict.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vision_ft.predict import collect_images, readable_images
from vision_ft.runtime import DEFAULT_BATCH_SIZE, OnnxClassifier, load_model


def is_onnx_model(source: Path) -> bool:
    """A model file (for the runtime) rather than a run folder."""
    return source.suffix.lower() == ".onnx" or source.is_file()


def onnx_probabilities(model_path: Path, path: Path, batch_size: int | None = None, skip_bad_images: bool = False
                       ) -> tuple[OnnxClassifier, list[Path], np.ndarray, dict[Path, str]]:
    """(the loaded model, images, probabilities of the readable ones N x classes, {skipped image:
    reason}) of the exported model `model_path` on the image or folder of images `path`."""
    model = load_model(model_path)
    images = collect_images(path)
    readable, skipped = readable_images(images, skip_bad_images, pixels=model.pixels)
    with tqdm(total=len(readable), desc="predict", unit="img", leave=False, disable=not sys.stderr.isatty()) as bar:
        probs = model.predict_proba(readable, batch_size or DEFAULT_BATCH_SIZE, progress=bar.update)
    return model, images, probs, skipped
