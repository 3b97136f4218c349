"""Predictions and heatmaps of an anomaly model: a run folder (torch) or an exported model (runtime)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vision_ft.anomaly.decision import anomaly_labels
from vision_ft.anomaly.evaluate import score_loader, scoring_batch_size
from vision_ft.anomaly.model_file import load_anomaly_run
from vision_ft.anomaly.runtime import OnnxAnomalyDetector
from vision_ft.data.dataset import ImageDataset
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.transforms import build_transforms
from vision_ft.run_model import default_device

HEADER = ["path", "label", "score"]


def anomaly_rows(images: list[Path], scores: np.ndarray, band: float) -> list[list[str]]:
    """CSV rows: path, good/defective/uncertain, normalised score."""
    return [[str(p), label, f"{s:.6f}"] for p, label, s in zip(images, anomaly_labels(scores, band), scores)]


@torch.no_grad()
def predict_anomaly_run(run_dir: Path, images: list[Path], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(normalised scores, maps N x H x W, uncertain band) of a run's fitted model on `images`."""
    device = default_device()
    loaded = load_anomaly_run(run_dir, device)
    cfg = loaded.config
    dataset = ImageDataset([Sample(p, 0) for p in images], build_transforms([], loaded.mean, loaded.std, train=False),
                           cfg.data.channels, cfg.data.image_size, max_pixels=cfg.data.max_pixels,
                           pixels=policy_from_config(cfg.data))
    batch = scoring_batch_size(loaded.scorer, batch_size or cfg.train.batch_size)
    loader = build_loader(dataset, batch, train=False, workers=cfg.data.workers)
    scores, _, _, maps = score_loader(loaded.scorer, loader, device, "predict", maps=True)
    return scores, maps, cfg.anomaly.uncertain_band


def predict_anomaly_onnx(model: OnnxAnomalyDetector, images: list[Path], batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The same from an exported model, without torch."""
    with tqdm(total=len(images), desc="predict", unit="img", leave=False, disable=not sys.stderr.isatty()) as bar:
        scores, maps = model.scores_and_maps(images, batch_size, progress=bar.update)
    return scores, maps, model.uncertain_band
