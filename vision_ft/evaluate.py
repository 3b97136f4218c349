"""`vision-ft eval`: evaluate a trained run on any labelled folder or CSV manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vision_ft.data.dataset import ImageDataset
from vision_ft.data.decode import find_bad_images
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.run_evaluation import SplitPredictions, evaluate_test, load_decision_rule
from vision_ft.plots import plot_confusion_matrix
from vision_ft.run_model import default_device, load_run
from vision_ft.train import predict_logits


def evaluate_run(
    run_dir: Path,
    data: Path,
    split: str | None = None,
    checkpoint: str = "best",
    batch_size: int | None = None,
    workers: int | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Metrics of a run's checkpoint on every image under `data` (or one split of a pre-split folder).

    The data is read by the run's task (class folders, multi-label or regression manifests) and
    checked against what the run was trained on; multi-label thresholds are the run's.
    """
    device = default_device()
    loaded = load_run(run_dir, checkpoint, device)
    cfg = loaded.config
    task = loaded.task
    index = task.discover(Path(data), known=loaded.class_names)
    samples = index.samples
    if split is not None:
        if not index.presplit or split not in index.presplit:
            raise VisionFTError(f"{data} has no '{split}' split folder; drop --split to evaluate every image")
        samples = index.presplit[split]
    pixels = policy_from_config(cfg.data)
    bad = find_bad_images([s.path for s in samples], workers=max(1, cfg.data.workers), pixels=pixels)
    if bad and not skip_bad_images:
        raise VisionFTError(
            f"{len(bad)} unreadable images in {data}, e.g. {bad[0][0]} ({bad[0][1]}); remove them or pass --skip-bad-images"
        )
    bad_paths = {p for p, _ in bad}
    samples = [s for s in samples if s.path not in bad_paths]
    dataset = ImageDataset(samples, build_transforms([], loaded.mean, loaded.std, train=False),
                           cfg.data.channels, cfg.data.image_size, pixels=pixels)
    loader = build_loader(dataset, batch_size or cfg.train.batch_size, train=False,
                          workers=cfg.data.workers if workers is None else workers)
    logits, targets = predict_logits(loaded.model, loader, device=next(loaded.model.parameters()).device)
    if task.kind == "classification":
        rule = load_decision_rule(run_dir, loaded.class_names)  # the run's temperature and thresholds
        metrics = task.evaluate(rule.probabilities(logits), targets)
        predictions = SplitPredictions(logits, targets, [str(s.path) for s in samples])
        metrics.update(evaluate_test(rule, predictions, loaded.class_names, cfg.eval, seed=cfg.train.seed))
    else:
        metrics = task.evaluate(task.scores(torch.from_numpy(logits)), targets)
    metrics["data"] = str(data)
    metrics["skipped_unreadable"] = len(bad)
    return metrics


def write_eval_outputs(metrics: dict[str, Any], class_names: list[str], out: Path) -> None:
    """metrics JSON plus, for classification, a confusion-matrix PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], class_names, out.with_suffix(".png"), f"eval on {metrics['data']}")
