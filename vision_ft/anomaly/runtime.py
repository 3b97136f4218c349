"""The torch-free anomaly detector: an exported anomaly model with its preprocessing.

Imports only numpy, onnxruntime, Pillow and vision-ft's torch-free modules; reached through
`vision_ft.runtime.load_model`, which returns an `OnnxAnomalyDetector` for anomaly models::

    model = load_model("model.onnx")
    for p in model.predict(["part_001.png"]):
        print(p.label, p.score, p.heatmap.shape)   # 'good' | 'defective' | 'uncertain'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vision_ft.anomaly.decision import anomaly_labels
from vision_ft.data.decode import ImageSource
from vision_ft.errors import VisionFTError
from vision_ft.runtime import DEFAULT_BATCH_SIZE, OnnxClassifier

TASK = "anomaly"
MAP_OUTPUT = "anomaly_map"


@dataclass(frozen=True)
class AnomalyPrediction:
    label: str  # 'good', 'defective' or 'uncertain'
    score: float  # normalised anomaly score; 0.5 is the threshold
    heatmap: np.ndarray  # H x W normalised anomaly map at the model's input size (0.5: threshold)


class OnnxAnomalyDetector(OnnxClassifier):
    """Outputs `score` (N) and `anomaly_map` (N x H x W); class names are ['good', 'defective']."""

    def _check_signature(self) -> None:
        super()._check_signature()
        outputs = {o.name for o in self.session.get_outputs()}
        if self.map_output not in outputs:
            raise VisionFTError(f"{self.source}: the graph has no '{self.map_output}' output; export the model again")

    @property
    def map_output(self) -> str:
        return str(self.metadata.extra.get("map_output", MAP_OUTPUT))

    @property
    def uncertain_band(self) -> float:
        return float(self.metadata.extra.get("uncertain_band", 0.0))

    def score_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores N, maps N x H x W) for a preprocessed batch."""
        meta = self.metadata
        scores, maps = self.session.run([meta.output_name, self.map_output], {meta.input_name: batch})
        return scores, maps

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The normalised scores (N) of a preprocessed batch."""
        return self.score_maps(batch)[0]

    def scores_and_maps(self, images: Sequence[ImageSource], batch_size: int = DEFAULT_BATCH_SIZE,
                        progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and heatmaps of a list of file paths, arrays or Pillow images, batch by batch."""
        if batch_size < 1:
            raise VisionFTError(f"batch size {batch_size} must be at least 1")
        images = list(images)
        height, width = self.input_size
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, height, width), np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch_scores, batch_maps = self.score_maps(self.preprocess(chunk))
            scores.append(batch_scores)
            maps.append(batch_maps)
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(scores), np.concatenate(maps)

    def predict_proba(self, images: Sequence[ImageSource], batch_size: int = DEFAULT_BATCH_SIZE,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """N x 2 columns [1 - score, score], in class-name order (good, defective)."""
        scores, _ = self.scores_and_maps(images, batch_size, progress)
        scores = scores.astype(np.float64)
        return np.stack([1 - scores, scores], axis=1)

    def predict(self, images: Sequence[ImageSource], threshold: float | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> list[AnomalyPrediction]:  # type: ignore[override]
        """An AnomalyPrediction per image. `threshold` is not used: the model's own threshold is 0.5
        and its uncertain band travels in its metadata."""
        scores, maps = self.scores_and_maps(images, batch_size)
        labels = anomaly_labels(scores, self.uncertain_band)
        return [AnomalyPrediction(label, float(score), heat) for label, score, heat in zip(labels, scores, maps)]

    def predict_one(self, image: ImageSource, threshold: float | None = None) -> AnomalyPrediction:  # type: ignore[override]
        return self.predict([image])[0]
