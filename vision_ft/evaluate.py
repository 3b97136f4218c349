"""`vision-ft eval`: evaluate a trained run on any labelled folder or CSV manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision_ft.data.bad_images import unreadable_images
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.run_evaluation import SplitPredictions, evaluate_test, load_decision_rule
from vision_ft.inference import eval_loader, infer
from vision_ft.plots import plot_confusion_matrix
from vision_ft.run_model import default_device, load_run


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
    bad = unreadable_images([s.path for s in samples], cfg.data.workers, skip_bad_images, str(data),
                            cfg.data.max_pixels)
    samples = [s for s in samples if s.path not in bad]
    loader = eval_loader(samples, cfg, loaded.mean, loaded.std, batch_size, workers)
    outputs = infer(loaded.model, loader, progress="eval", tta=cfg.eval.tta)  # as the run evaluated its test split
    broken = int((~np.isfinite(outputs.logits).all(axis=1)).sum())
    if broken:
        raise VisionFTError(
            f"the {checkpoint} checkpoint of {run_dir} gives non-finite outputs (NaN or inf) for {broken} of "
            f"{len(outputs.logits)} images; its weights are damaged: restore the run folder or train it again"
        )
    if task.kind == "classification":
        rule = load_decision_rule(run_dir, loaded.class_names)  # the run's temperature and thresholds
        # The training's test line is computed on the plain softmax; so is this one, so the two agree.
        metrics = task.evaluate(task.scores(torch.from_numpy(outputs.logits)), outputs.labels)
        predictions = SplitPredictions(outputs.logits, outputs.labels, [str(s.path) for s in samples])
        metrics.update(evaluate_test(rule, predictions, loaded.class_names, cfg.eval, seed=cfg.train.seed))
    else:
        scores = task.scores(torch.from_numpy(outputs.logits))
        metrics = task.evaluate(scores, outputs.labels)
        metrics["test_ci"] = task.intervals(scores, outputs.labels, None, cfg.eval, cfg.train.seed)
    metrics["data"] = str(data)
    metrics["skipped_unreadable"] = len(bad)
    return metrics


def write_eval_outputs(metrics: dict[str, Any], class_names: list[str], out: Path) -> None:
    """metrics JSON plus, for classification, a confusion-matrix PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], class_names, out.with_suffix(".png"), f"eval on {metrics['data']}")
