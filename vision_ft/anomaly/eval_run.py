"""`vision-ft eval RUN --data FOLDER` for anomaly runs: metrics and the score histogram on any
folder of good and defective parts (the good class by the run's anomaly.good_class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vision_ft.anomaly.data import good_only_folder
from vision_ft.anomaly.evaluate import (
    add_intervals,
    anomaly_metrics,
    score_loader,
    scoring_batch_size,
)
from vision_ft.anomaly.model_file import load_anomaly_run
from vision_ft.anomaly.plots import plot_score_histogram
from vision_ft.data.dataset import ImageDataset
from vision_ft.data.decode import find_bad_images
from vision_ft.data.discover import discover
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.run_model import default_device


def evaluate_anomaly_run(run_dir: Path, data: Path, split: str | None = None, skip_bad_images: bool = False) -> dict[str, Any]:
    """Image-level anomaly metrics of a run on every image under `data` (or one split of it)."""
    device = default_device()
    loaded = load_anomaly_run(run_dir, device)
    cfg = loaded.config
    good_class = cfg.anomaly.good_class
    data = Path(data)
    index = (good_only_folder(data.resolve(), good_class) if data.is_dir() else None) or discover(data, every_class_trains=False)
    samples = index.samples
    if split is not None:
        if not index.presplit or split not in index.presplit:
            raise VisionFTError(f"{data} has no '{split}' split folder; drop --split to evaluate every image")
        samples = index.presplit[split]
    if good_class not in index.class_names:
        raise VisionFTError(f"{data} has no '{good_class}' class (classes: {', '.join(index.class_names)}); the run "
                            "counts that class as good and every other class as defective")
    pixels = policy_from_config(cfg.data)
    bad = find_bad_images([s.path for s in samples], workers=max(1, cfg.data.workers), pixels=pixels,
                          max_pixels=cfg.data.max_pixels)
    if bad and not skip_bad_images:
        raise VisionFTError(f"{len(bad)} unreadable images in {data}, e.g. {bad[0][0]} ({bad[0][1]}); "
                            "remove them or pass --skip-bad-images")
    samples = [s for s in samples if s.path not in {p for p, _ in bad}]
    dataset = ImageDataset(samples, build_transforms([], loaded.mean, loaded.std, train=False),
                           cfg.data.channels, cfg.data.image_size, max_pixels=cfg.data.max_pixels, pixels=pixels)
    loader = build_loader(dataset, scoring_batch_size(loaded.scorer, cfg.train.batch_size), train=False,
                          workers=cfg.data.workers)
    scores, _, labels, _ = score_loader(loaded.scorer, loader, device, "eval")
    good = index.class_names.index(good_class)
    metrics = add_intervals(anomaly_metrics(scores, labels, index.class_names, good, cfg.anomaly.uncertain_band),
                            scores, labels, good, cfg.eval.bootstrap_resamples, cfg.eval.confidence)
    metrics.update(data=str(data), skipped_unreadable=len(bad), scores=scores.tolist(), labels=labels.tolist(),
                   class_names=index.class_names, good_label=good)
    return metrics


def write_anomaly_eval_outputs(metrics: dict[str, Any], out: Path) -> None:
    """metrics JSON plus the score histogram PNG beside it."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    labels = np.asarray(metrics["labels"])
    good = metrics["good_label"]
    groups = {name: labels == i for i, name in enumerate(metrics["class_names"]) if i != good and (labels == i).any()}
    plot_score_histogram(np.asarray(metrics["scores"]), labels != good, out.with_suffix(".png"), f"eval on {metrics['data']}", groups)
