"""`vision-ft train --task anomaly`: fit a PatchCore-style model on good parts, choose the
threshold, evaluate, export, and write the run folder like any training run.

Nothing is trained: the backbone stays frozen, one pass over the good training images
collects patch features (a bounded uniform sample of them), the greedy coreset picks the memory
bank, and the validation split sets the threshold.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vision_ft.anomaly.coreset import greedy_coreset
from vision_ft.anomaly.data import AnomalyData, anomaly_splits
from vision_ft.anomaly.evaluate import (
    add_intervals,
    anomaly_metrics,
    format_anomaly_summary,
    score_loader,
    scoring_batch_size,
)
from vision_ft.anomaly.features import PatchFeatureExtractor, build_extractor
from vision_ft.anomaly.plots import plot_score_histogram
from vision_ft.anomaly.reservoir import PatchReservoir
from vision_ft.anomaly.scorer import AnomalyScorer, support_sets
from vision_ft.anomaly.threshold import choose_threshold
from vision_ft.checkpoint import save_checkpoint
from vision_ft.config import Config, save_config
from vision_ft.data.dataset import ImageDataset
from vision_ft.data.decode import find_bad_images
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.split import save_split
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.models.create import check_model_name
from vision_ft.plots import plot_confusion_matrix
from vision_ft.run_folder import RunFolder, create_run_folder
from vision_ft.run_model import default_device, normalisation

log = logging.getLogger("vision_ft")


def _progress_disabled() -> bool:
    return not sys.stderr.isatty()


def _drop_unreadable(config: Config, data: AnomalyData) -> AnomalyData:
    every = [s.path for part in data.splits.values() for s in part]
    bad = find_bad_images(every, workers=max(1, config.data.workers), pixels=policy_from_config(config.data),
                          max_pixels=config.data.max_pixels)
    if not bad:
        return data
    listed = ", ".join(f"{p} ({why})" for p, why in bad[:3])
    if not config.data.skip_bad_images:
        raise VisionFTError(f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''}: {listed}; "
                            "remove or fix them, or pass --skip-bad-images to leave them out")
    log.warning("leaving out %d unreadable images: %s", len(bad), listed)
    paths = {p for p, _ in bad}
    return AnomalyData(data.index, data.good_label, {k: [s for s in v if s.path not in paths] for k, v in data.splits.items()})


def _loader(config: Config, samples: list[Sample], mean: list[float], std: list[float], batch: int) -> Any:
    dataset = ImageDataset(samples, build_transforms([], mean, std, train=False), config.data.channels,
                           config.data.image_size, skip_bad=config.data.skip_bad_images,
                           max_pixels=config.data.max_pixels, pixels=policy_from_config(config.data))
    return build_loader(dataset, batch, train=False, workers=config.data.workers)


@torch.no_grad()
def collect_patches(extractor: PatchFeatureExtractor, loader: Any, device: torch.device, capacity: int,
                    seed: int) -> PatchReservoir:
    """Patch features of every image of `loader`, as a uniform sample of at most `capacity` rows."""
    reservoir = PatchReservoir(capacity, seed)
    for images, _ in tqdm(loader, desc="patch features", unit="batch", leave=False, disable=_progress_disabled()):
        features = extractor(images.to(device))
        reservoir.add(features.reshape(-1, features.shape[-1]))
    return reservoir


def fit_scorer(config: Config, extractor: PatchFeatureExtractor, loader: Any, device: torch.device) -> tuple[AnomalyScorer, dict[str, Any]]:
    """The memory bank of the good training images, as an AnomalyScorer (threshold not yet set)."""
    cfg = config.anomaly
    started = time.perf_counter()
    reservoir = collect_patches(extractor, loader, device, cfg.max_patches, config.train.seed)
    pool = reservoir.rows()
    collected = time.perf_counter()
    count = max(1, math.ceil(cfg.coreset_fraction * len(pool)))
    with tqdm(total=count, desc="coreset", leave=False, disable=_progress_disabled()) as bar:
        coreset = greedy_coreset(pool.to(device), count, cfg.projection_dim, config.train.seed, progress=bar.update)
    bank = pool[coreset.indices]
    scorer = AnomalyScorer(extractor, bank, support_sets(bank.to(device), cfg.neighbours).cpu(),
                           config.data.image_size, cfg.blur_sigma).to(device)
    info = {
        "patches_seen": reservoir.seen, "patches_kept": len(pool), "bank_size": int(bank.shape[0]),
        "feature_dim": int(bank.shape[1]), "grid": list(extractor.grid), "layers": extractor.layers,
        "coreset_radius": coreset.radius, "features_seconds": round(collected - started, 1),
        "coreset_seconds": round(time.perf_counter() - collected, 1),
    }
    log.info("memory bank: %d of %d patch features (%d seen), %d dims; features %.0fs, coreset %.0fs",
             info["bank_size"], info["patches_kept"], info["patches_seen"], info["feature_dim"],
             info["features_seconds"], info["coreset_seconds"])
    return scorer, info


def train_anomaly(config: Config, out: Path, force: bool = False) -> "TrainResult":  # noqa: F821
    """Fit, threshold, evaluate, export and report an anomaly run into the run folder `out`."""
    from vision_ft.train import TrainResult

    check_model_name(config.model.name)
    data = _drop_unreadable(config, anomaly_splits(config))
    run = create_run_folder(Path(out), force=force)
    save_config(config, run.config)
    save_split(run.split, data.splits, data.index, config.data.split_seed)
    handler = _log_to(run)
    try:
        metrics = _fit_and_evaluate(config, run, data)
    except BaseException:
        if not run.best.joinpath("state.json").is_file():
            _close(handler)
            shutil.rmtree(run.root, ignore_errors=True)  # nothing worth keeping; the fixed command needs no --force
        raise
    finally:
        _close(handler)
    return TrainResult(run.root, metrics, best_epoch=0, epochs_run=0, stopped_early=False)


def _log_to(run: RunFolder) -> logging.Handler:
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(run.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    log.propagate = False
    return handler


def _close(handler: logging.Handler) -> None:
    if handler in log.handlers:
        log.removeHandler(handler)
        handler.close()


def _describe(data: AnomalyData) -> str:
    names = data.index.class_names
    parts = []
    for split, samples in data.splits.items():
        counts = {name: sum(1 for s in samples if s.label == i) for i, name in enumerate(names)}
        parts.append(f"{split} {len(samples)} ({', '.join(f'{k}:{v}' for k, v in counts.items() if v)})")
    return "; ".join(parts)


def _fit_and_evaluate(config: Config, run: RunFolder, data: AnomalyData) -> dict[str, Any]:
    device = default_device()
    torch.manual_seed(config.train.seed)
    log.info("run folder %s", run.root)
    log.info("anomaly data %s, fitted on '%s' only: %s", config.data.path, config.anomaly.good_class, _describe(data))
    extractor = build_extractor(config).to(device)
    mean, std = normalisation(config, extractor.backbone)
    log.info("backbone %s (%s weights, frozen), layers %s, %d px, patch grid %s", config.model.name,
             config.model.weights, extractor.layers, config.data.image_size, extractor.grid)
    batch = config.train.batch_size
    scorer, info = fit_scorer(config, extractor, _loader(config, data.splits["train"], mean, std, batch), device)
    batch = scoring_batch_size(scorer, batch)
    loaders = {name: _loader(config, data.splits[name], mean, std, batch) for name in ("val", "test") if data.splits.get(name)}
    if "val" not in loaders:
        raise VisionFTError("anomaly runs need a validation split to set the threshold on; set data.val_fraction above 0")
    _, raw_val, val_labels, _ = score_loader(scorer, loaders["val"], device, "val")
    choice = choose_threshold(raw_val, val_labels != data.good_label, config.anomaly)
    scorer.threshold.fill_(choice.threshold)
    scorer.scale.fill_(choice.scale)
    log.info("threshold: %s", choice.reason)
    state = {"epoch": 0, "task": "anomaly", "fit": info, "threshold": {"raw": choice.threshold, "scale": choice.scale,
                                                          "rule": choice.rule, "reason": choice.reason}}
    save_checkpoint(run.best, scorer, state)
    metrics = _evaluate_splits(config, run, data, scorer, loaders, device)
    run.metrics.write_text(json.dumps(metrics, indent=1))
    if config.export.onnx:
        _export(run)
    from vision_ft.anomaly.report import write_anomaly_report

    write_anomaly_report(run, config, data.index.class_names, metrics, state)
    return metrics


def _evaluate_splits(config: Config, run: RunFolder, data: AnomalyData, scorer: AnomalyScorer, loaders: dict[str, Any],
                     device: torch.device) -> dict[str, Any]:
    names = data.index.class_names
    metrics: dict[str, Any] = {}
    run.plots.mkdir(exist_ok=True)
    for split, loader in loaders.items():
        scores, _, labels, _ = score_loader(scorer, loader, device, split)
        metrics[split] = add_intervals(anomaly_metrics(scores, labels, names, data.good_label, config.anomaly.uncertain_band),
                                       scores, labels, data.good_label, config.eval.bootstrap_resamples,
                                       config.eval.confidence, config.train.seed)
        defect = labels != data.good_label
        groups = {name: labels == i for i, name in enumerate(names) if i != data.good_label and (labels == i).any()}
        plot_score_histogram(scores, defect, run.plots / f"scores_{split}.png", f"{split} split", groups)
        plot_confusion_matrix(metrics[split]["confusion_matrix"], ["good", "defective"], run.plots / f"confusion_{split}.png",
                              f"{split} split at the threshold")
        log.info("%s: %s", split, format_anomaly_summary(metrics[split]))
    return metrics


def _export(run: RunFolder) -> None:
    """RUN/model.onnx; a model that cannot be exported costs the run nothing but a warning."""
    from vision_ft.anomaly.export import export_anomaly_run

    try:
        result = export_anomaly_run(run.root, force=True, echo=log.info)
    except VisionFTError as exc:
        log.warning("no ONNX model written: %s; retry with `vision-ft export %s` (or set export.onnx=false)", exc, run.root)
        return
    log.info("ONNX model %s (%.1f MB, verified against onnxruntime)", result.path, result.path.stat().st_size / 1e6)
