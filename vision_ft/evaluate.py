"""`vision-ft eval`: evaluate a trained run on any labelled folder or CSV manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.data.bad_images import unreadable_images
from vision_ft.data.discover import Sample, discover
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.run_evaluation import SplitPredictions, evaluate_test, load_decision_rule
from vision_ft.inference import eval_loader, evaluate_probs, infer
from vision_ft.plots import plot_confusion_matrix
from vision_ft.run_model import default_device, load_run


def _relabel(samples: list[Sample], source_names: list[str], run_names: list[str], data: Path) -> list[Sample]:
    """Map the folder's class indices onto the run's, by class name."""
    unknown = sorted(set(source_names) - set(run_names))
    if unknown:
        raise VisionFTError(
            f"{data} has classes the run was not trained on: {', '.join(unknown)}; the run knows {', '.join(run_names)}"
        )
    to_run = {i: run_names.index(name) for i, name in enumerate(source_names)}
    return [Sample(s.path, to_run[s.label]) for s in samples]


def evaluate_run(
    run_dir: Path,
    data: Path,
    split: str | None = None,
    checkpoint: str = "best",
    batch_size: int | None = None,
    workers: int | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Metrics of a run's checkpoint on every image under `data` (or one split of a pre-split folder)."""
    device = default_device()
    loaded = load_run(run_dir, checkpoint, device)
    cfg = loaded.config
    index = discover(Path(data))
    samples = index.samples
    if split is not None:
        if not index.presplit or split not in index.presplit:
            raise VisionFTError(f"{data} has no '{split}' split folder; drop --split to evaluate every image")
        samples = index.presplit[split]
    samples = _relabel(samples, index.class_names, loaded.class_names, Path(data))
    bad = unreadable_images([s.path for s in samples], cfg.data.workers, skip_bad_images, str(data),
                            cfg.data.max_pixels)
    samples = [s for s in samples if s.path not in bad]
    loader = eval_loader(samples, cfg, loaded.mean, loaded.std, batch_size, workers)
    outputs = infer(loaded.model, loader, progress="eval")
    rule = load_decision_rule(run_dir, loaded.class_names)  # the run's temperature and thresholds
    probs = rule.probabilities(outputs.logits)
    broken = int((~np.isfinite(probs).all(axis=1)).sum())
    if broken:
        raise VisionFTError(
            f"the {checkpoint} checkpoint of {run_dir} gives non-finite outputs (NaN or inf) for {broken} of "
            f"{len(probs)} images; its weights are damaged: restore the run folder or train it again"
        )
    metrics = evaluate_probs(probs, outputs.labels, loaded.class_names, cfg.train.label_smoothing)
    predictions = SplitPredictions(outputs.logits, outputs.labels, [str(s.path) for s in samples])
    metrics.update(evaluate_test(rule, predictions, loaded.class_names, cfg.eval, seed=cfg.train.seed))
    metrics["data"] = str(data)
    metrics["skipped_unreadable"] = len(bad)
    return metrics


def write_eval_outputs(metrics: dict[str, Any], class_names: list[str], out: Path) -> None:
    """metrics JSON plus a confusion-matrix PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, out.with_suffix(".png"), f"eval on {metrics['data']}")
