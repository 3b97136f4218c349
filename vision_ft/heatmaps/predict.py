"""`vision-ft predict SOURCE IMAGES [--heatmaps OUT]` for anomaly models (always) and for
classifiers asked for heatmaps: the prediction rows, and one overlaid PNG per image.

Sources: a run folder (torch; classifiers get CAM or Grad-CAM) or an exported model (onnxruntime
only; anomaly maps, or the class activation maps exported with CNN classifiers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vision_ft.errors import VisionFTError
from vision_ft.heatmaps.overlay import min_max
from vision_ft.heatmaps.write import heatmap_paths, write_heatmaps
from vision_ft.predict import collect_images, prediction_header, prediction_rows


def is_model_file(source: Path) -> bool:
    return source.suffix.lower() == ".onnx" or source.is_file()


def is_anomaly_source(source: Path) -> bool:
    """An anomaly run folder or an exported anomaly model."""
    if is_model_file(source):
        from vision_ft.onnx_metadata import ModelMetadata
        from vision_ft.runtime import open_session

        properties = open_session(source).get_modelmeta().custom_metadata_map
        return ModelMetadata.from_properties(properties, str(source)).extra.get("task") == "anomaly"
    from vision_ft.run_model import is_anomaly_run

    return is_anomaly_run(source)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", leave=False, disable=not sys.stderr.isatty())


def _anomaly(source: Path, images: list[Path], batch_size: int | None) -> tuple[list[str], list[list[str]], list[np.ndarray]]:
    from vision_ft.anomaly.predict import HEADER, anomaly_rows

    if is_model_file(source):
        from vision_ft.anomaly.predict import predict_anomaly_onnx
        from vision_ft.runtime import DEFAULT_BATCH_SIZE, load_model

        scores, maps, band = predict_anomaly_onnx(load_model(source), images, batch_size or DEFAULT_BATCH_SIZE)
    else:
        from vision_ft.anomaly.predict import predict_anomaly_run

        scores, maps, band = predict_anomaly_run(source, images, batch_size)
    # Anomaly maps keep their scale: 0.5 is the threshold in every image, so colours compare.
    return HEADER, anomaly_rows(images, scores, band), list(maps)


def _classifier(source: Path, images: list[Path], top_k: int, batch_size: int | None,
                threshold: float | None) -> tuple[list[str], list[list[str]], list[np.ndarray]]:
    if is_model_file(source):
        from vision_ft.runtime import DEFAULT_BATCH_SIZE, load_model

        model = load_model(source)
        with _progress(len(images)) as bar:
            probs, maps = model.probabilities_and_maps(images, batch_size or DEFAULT_BATCH_SIZE, progress=bar.update)
        names, rule = model.class_names, model.rule
    else:
        from vision_ft.heatmaps.classifier import run_heatmaps
        from vision_ft.run_model import load_run

        from vision_ft.evaluation.run_evaluation import load_decision_rule

        probs, maps, _ = run_heatmaps(source, images, batch_size)
        names = load_run(source).class_names
        rule = load_decision_rule(source, names)
    top_k = max(1, min(top_k, len(names)))
    # Class activation maps have no fixed range: each is scaled to its own 0..1.
    return prediction_header(top_k), prediction_rows(images, probs, names, top_k, rule, threshold), [min_max(m) for m in maps]


def predict_and_draw(source: Path, path: Path, heatmaps: Path | None, top_k: int = 3, batch_size: int | None = None,
                     threshold: float | None = None, echo: Callable[[str], None] = print) -> tuple[list[str], list[list[str]]]:
    """Prediction rows for `path`; with `heatmaps`, also writes each image with its map overlaid."""
    images = collect_images(path)
    if heatmaps is not None:
        heatmap_paths(images, path, heatmaps)  # refuse before the slow part
    anomaly = is_anomaly_source(source)
    if anomaly and threshold is not None:
        raise VisionFTError("--threshold is for classifiers; an anomaly model carries its own threshold (0.5) and "
                            "uncertain band (anomaly.uncertain_band)")
    header, rows, maps = _anomaly(source, images, batch_size) if anomaly else _classifier(source, images, top_k, batch_size, threshold)
    if heatmaps is not None:
        written = write_heatmaps(images, maps, path, heatmaps)
        echo(f"{written} heatmaps written to {heatmaps}")
    return header, rows
