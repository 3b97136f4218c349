"""Heatmaps of a classifier run: CAM where the head allows it, Grad-CAM otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vision_ft.data.dataset import ImageDataset
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.transforms import build_transforms
from vision_ft.heatmaps.cam import CamClassifier, has_linear_cam
from vision_ft.heatmaps.gradcam import gradcam
from vision_ft.run_model import default_device, load_run


def top_class_maps(cams: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's map (N x h x w) for its most probable class, from maps of every class (N x K x h x w)."""
    return cams[np.arange(len(cams)), probs.argmax(1)]


def run_heatmaps(run_dir: Path, images: list[Path], batch_size: int | None = None) -> tuple[np.ndarray, list[np.ndarray], str]:
    """(probabilities N x K, one map per image for its top class, the method used) of a run's best checkpoint."""
    device = default_device()
    loaded = load_run(run_dir, device=device)
    cfg = loaded.config
    dataset = ImageDataset([Sample(p, 0) for p in images], build_transforms([], loaded.mean, loaded.std, train=False),
                           cfg.data.channels, cfg.data.image_size, max_pixels=cfg.data.max_pixels,
                           pixels=policy_from_config(cfg.data))
    loader = build_loader(dataset, batch_size or cfg.train.batch_size, train=False, workers=cfg.data.workers)
    exact = has_linear_cam(loaded.model, cfg.data.channels, cfg.data.image_size)
    cam_model = CamClassifier(loaded.model).eval() if exact else None
    all_probs, maps = [], []
    for batch, _ in tqdm(loader, desc="heatmaps", leave=False, disable=not sys.stderr.isatty()):
        batch = batch.to(device)
        if cam_model is not None:
            with torch.no_grad():
                logits, cams = cam_model(batch)
            probs = torch.softmax(logits.float(), 1).cpu().numpy()
            batch_maps = top_class_maps(cams.float().cpu().numpy(), probs)
        else:
            logits, grad_maps = gradcam(loaded.model, batch)
            probs = torch.softmax(logits.float(), 1).cpu().numpy()
            batch_maps = grad_maps.float().cpu().numpy()
        all_probs.append(probs)
        maps.extend(batch_maps)
    return np.concatenate(all_probs), maps, "cam" if exact else "gradcam"


