"""Cross-validation: a loop over ordinary runs, one run folder per fold.

`cross_validate(config, out, folds=5)` divides the data into stratified folds (grouped when
`data.group_by` is set, so no patient is in two folds). Fold k is the test set of run
``out/fold-k``; a stratified (grouped) part of the other folds is its validation set for early
stopping, calibration and thresholds. Each fold's split is written as a CSV manifest with a
split column (``out/manifests/``) and trained with the ordinary `train`, so a fold is a normal
run folder: its report, plots, ONNX model and predictions are all there.

Folds run one after another. An interrupted CV resumes where it stopped: finished folds (those
with a metrics.json) are skipped, a fold with a last checkpoint continues from it.

`out/summary.json` and `out/report.md` give every test metric as mean ± sd over folds with a
95% t-interval for the mean, a per-fold table, and metrics of the pooled out-of-fold
predictions (`out/oof_predictions.csv`) with bootstrap intervals. `--repeats` repeats the fold
assignment with other shuffles and `--seeds` whole runs with other training seeds; the spread of
the pooled metrics over those replicates is reported too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats

from vision_ft.config import Config
from vision_ft.data.discover import Sample
from vision_ft.data.groups import assign_groups, hold_out, stratified_folds
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.bootstrap import bootstrap_metrics
from vision_ft.evaluation.run_evaluation import PREDICTIONS_FILE, load_decision_rule, read_predictions
from vision_ft.evaluation.task_intervals import bootstrap_task_metrics, multilabel_resampled, regression_resampled
from vision_ft.metrics import compute_metrics
from vision_ft.tasks import build_task
from vision_ft.tasks.base import Task
from vision_ft.tasks.predictions_file import read_scored
from vision_ft.tasks.splits import grouped, task_splitter, vector_folds

log = logging.getLogger("vision_ft")

CV_MARKER = ".vision-ft-cv"
FOLD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")
# The test metrics summarised over folds, per task (classification: FOLD_METRICS).
TASK_FOLD_METRICS = {"classification": FOLD_METRICS,
                     "multilabel": ("macro_auroc", "map", "macro_f1", "micro_auroc", "micro_f1", "loss"),
                     "regression": ("rmse", "mae", "r2", "pearson", "spearman", "loss")}
# Metrics that are not rates in [0, 1]: their intervals are not clipped.
UNBOUNDED = frozenset({"loss", "temperature", "threshold", "rmse", "mae", "r2", "pearson", "spearman"})
CALIBRATION_METRICS = ("ece", "brier", "nll")
RATE_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")


@dataclass(frozen=True)
class FoldPlan:
    """One run of the CV: which replicate, which fold, where it lives."""

    seed: int
    repeat: int
    fold: int  # 1-based
    folder: Path
    manifest: Path

    @property
    def replicate(self) -> str:
        return f"seed-{self.seed}/repeat-{self.repeat}"


@dataclass
class CVResult:
    out: Path
    summary: dict[str, Any]
    folds: list[Path]


# ------------------------------------------------------------------ planning


def _open_cv_folder(out: Path, force: bool) -> None:
    """Create `out`, or reuse it when it is an earlier CV (resume); never touch other folders."""
    if out.exists() and not (out / CV_MARKER).is_file():
        if out.is_file() or any(out.iterdir()):
            raise VisionFTError(f"{out} exists and is not a vision-ft CV folder; choose another --out")
    if force and (out / CV_MARKER).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CV_MARKER).touch()


def _data_fingerprint(samples: list[Sample], groups: dict[Path, str] | None) -> str:
    lines = sorted(f"{s.path}\t{s.label}\t{s.target}\t{groups[s.path] if groups else ''}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _write_manifest(path: Path, parts: dict[str, list[Sample]], kind: str, names: list[str],
                    groups: dict[Path, str] | None) -> None:
    """A fold's CSV manifest in the task's format (label; `;`-separated labels; one column per target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"classification": ["label"], "multilabel": ["labels"], "regression": list(names)}[kind]

    def values(s: Sample) -> list[str]:
        if kind == "classification":
            return [names[s.label]]
        if kind == "multilabel":
            return [";".join(name for name, v in zip(names, s.target) if v >= 0.5)]
        return [f"{v:.9g}" for v in s.target]

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *columns, "split", *(["group"] if groups else [])])
        for split, samples in parts.items():
            for s in samples:
                writer.writerow([str(s.path), *values(s), split, *([groups[s.path]] if groups else [])])


def _fold_parts(task: Task, samples: list[Sample], groups: dict[Path, str] | None, folds: int, val_fraction: float,
                seed: int) -> list[tuple[list[Sample], list[Sample], list[Sample]]]:
    """(train, val, test) per fold: test is the fold, val a stratified (grouped) part of the rest."""
    kind = task.kind
    if kind == "classification":
        held = stratified_folds(samples, groups, folds, seed, what="folds")
    else:
        held = vector_folds(samples, groups, folds, seed, kind)
    parts = []
    for test_index in held:
        test_set = set(test_index.tolist())
        rest = [s for i, s in enumerate(samples) if i not in test_set]
        if kind == "classification":
            train, val = hold_out(rest, groups, val_fraction, seed, "parts for a validation split")
        else:
            splitter = grouped(task_splitter(kind), groups) if groups else task_splitter(kind)
            carved = splitter(rest, val_fraction, 0.0, seed)
            train, val = carved["train"], carved["val"]
        parts.append((train, val, [samples[i] for i in sorted(test_set)]))
    return parts


def plan_folds(config: Config, out: Path, folds: int, repeats: int, seeds: list[int]) -> tuple[list[FoldPlan], list[str]]:
    """Fold assignments and their manifests (rewritten identically on resume); class names."""
    if folds < 2:
        raise VisionFTError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if repeats < 1:
        raise VisionFTError(f"--repeats {repeats} must be at least 1")
    if not config.data.path:
        raise VisionFTError("no data given; pass --data DIR (a folder of class folders, or a CSV manifest)")
    task = build_task(config)
    index = task.discover(Path(config.data.path))
    groups = assign_groups(index, config.data.group_by, config.data.path) if config.data.group_by else None
    samples = sorted(index.samples, key=lambda s: str(s.path))  # pre-split data is pooled: CV re-splits it
    fingerprint = _data_fingerprint(samples, groups)
    plan_file = out / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        raise VisionFTError(f"{out} holds a CV of other data (images, labels or groups changed); use another --out or --force")
    plans = []
    for seed in seeds:
        for repeat in range(repeats):
            parts = _fold_parts(task, samples, groups, folds, config.data.val_fraction, config.data.split_seed + repeat)
            for k, (train, val, test) in enumerate(parts, start=1):
                parent = out / (f"seed-{seed}" if len(seeds) > 1 else "") / (f"repeat-{repeat + 1}" if repeats > 1 else "")
                plan = FoldPlan(seed, repeat + 1, k, parent / f"fold-{k}",
                                out / "manifests" / f"{str(parent.relative_to(out)).replace('/', '-').strip('.-') or 'cv'}-fold-{k}.csv")
                _write_manifest(plan.manifest, {"train": train, "val": val, "test": test}, task.kind,
                                index.class_names, groups)
                plans.append(plan)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint, "folds": folds, "repeats": repeats, "seeds": seeds,
                                     "group_by": config.data.group_by}, indent=1))
    return plans, list(index.class_names)


# ------------------------------------------------------------------ running


def _fold_config(config: Config, plan: FoldPlan, grouped: bool, names: list[str]) -> Config:
    tree = config.model_dump(mode="json")
    tree["data"]["path"] = str(plan.manifest)
    tree["data"]["group_by"] = "group" if grouped else None  # the manifest's column
    tree["data"]["label_columns"] = None  # multi-label fold manifests have a `labels` column
    if config.task == "regression":  # one column per target, named as the targets
        tree["data"]["target_columns"] = list(names)
    tree["train"]["seed"] = plan.seed
    return Config.model_validate(tree)


def run_fold(config: Config, plan: FoldPlan) -> None:
    """Train one fold unless it is finished; continue it from its last checkpoint when there is one."""
    from vision_ft.train import train

    if (plan.folder / "metrics.json").is_file():
        log.info("fold %d (%s) already finished, skipped", plan.fold, plan.replicate)
        return
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    resume = (plan.folder / "checkpoints" / "last" / "state.json").is_file()
    log.info("fold %d (%s): %s", plan.fold, plan.replicate, "resuming" if resume else "training")
    train(config, plan.folder, force=plan.folder.exists() and not resume, resume=resume)


def cross_validate(
    config: Config,
    out: Path | str,
    folds: int = 5,
    repeats: int = 1,
    seeds: list[int] | None = None,
    force: bool = False,
    after_fold: Callable[[FoldPlan], None] | None = None,
) -> CVResult:
    """Run (or resume) a k-fold cross-validation into `out`; see the module docstring.

    `after_fold` is called with each finished fold's plan (the hyperparameter search reports
    the running mean to its pruner there, and may stop the CV by raising)."""
    out = Path(out)
    seeds = list(seeds) if seeds else [config.train.seed]
    if len(set(seeds)) != len(seeds):
        raise VisionFTError(f"--seeds {seeds} repeats a seed; give distinct seeds")
    fresh = not out.exists() or force
    _open_cv_folder(out, force)
    try:
        plans, class_names = plan_folds(config, out, folds, repeats, seeds)
    except VisionFTError:
        if fresh:  # a request refused before any fold ran leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    for plan in plans:
        run_fold(_fold_config(config, plan, bool(config.data.group_by), class_names), plan)
        if after_fold is not None:
            after_fold(plan)
    summary = summarise(plans, class_names, out, config)
    return CVResult(out, summary, [plan.folder for plan in plans])


# ------------------------------------------------------------------ summary


def mean_interval(values: list[float], confidence: float = 0.95, bounded: bool = False) -> dict[str, float | None]:
    """Mean, sd and the t-interval of the mean over folds (folds share training data, so read it
    as a description of the spread, not an exact coverage guarantee). `bounded`: a rate, whose
    interval is clipped to [0, 1]."""
    clean = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(clean) == 0:
        return {"mean": None, "sd": None, "low": None, "high": None, "n": 0}
    mean = float(clean.mean())
    if len(clean) < 2:
        return {"mean": mean, "sd": None, "low": None, "high": None, "n": 1}
    sd = float(clean.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(clean) - 1)) * sd / np.sqrt(len(clean))
    low, high = (max(0.0, mean - half), min(1.0, mean + half)) if bounded else (mean - half, mean + half)
    return {"mean": mean, "sd": sd, "low": low, "high": high, "n": int(len(clean))}


def _fold_row(plan: FoldPlan, kind: str) -> dict[str, Any]:
    metrics = json.loads((plan.folder / "metrics.json").read_text())
    row: dict[str, Any] = {"replicate": plan.replicate, "fold": plan.fold, "images": metrics["test"]["num_samples"],
                           "best_epoch": metrics.get("best_epoch")}
    row.update({name: metrics["test"].get(name) for name in TASK_FOLD_METRICS[kind]})
    calibration = metrics.get("calibration_test")
    if calibration:
        row["temperature"] = calibration["temperature"]
        row.update({f"{name}_calibrated": calibration["after"][name] for name in CALIBRATION_METRICS})
        row.update({f"{name}_uncalibrated": calibration["before"][name] for name in CALIBRATION_METRICS})
    point = metrics.get("operating_point")
    for name, value in (metrics.get("operating_point_test") or {}).items():
        row[f"{name}_at_threshold"] = value["value"] if isinstance(value, dict) else value
    if point:
        row["threshold"] = point["threshold"]
    return row


def _oof_rows(plans: list[FoldPlan], class_names: list[str]) -> list[dict[str, Any]]:
    """Every fold's test predictions under its own decision rule (temperature, threshold)."""
    rows = []
    for plan in plans:
        test = read_predictions(plan.folder / PREDICTIONS_FILE, class_names)["test"]
        rule = load_decision_rule(plan.folder, class_names)
        probabilities = rule.probabilities(test.logits)
        decided = rule.decide(probabilities)
        for i, path in enumerate(test.paths):
            rows.append({"replicate": plan.replicate, "fold": plan.fold, "path": path,
                         "group": test.groups[i] if test.groups else "", "label": int(test.labels[i]),
                         "decided": int(decided[i]), "probabilities": probabilities[i]})
    return rows


def write_oof(path: Path, rows: list[dict[str, Any]], class_names: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["replicate", "fold", "path", "group", "label", "decided",
                         *(f"prob_{name}" for name in class_names)])
        for row in rows:
            decided = class_names[row["decided"]] if row["decided"] >= 0 else "uncertain"
            writer.writerow([row["replicate"], row["fold"], row["path"], row["group"], class_names[row["label"]],
                             decided, *(f"{p:.6f}" for p in row["probabilities"])])


def pooled_metrics(rows: list[dict[str, Any]], class_names: list[str], config: Config) -> dict[str, Any]:
    """Metrics of one replicate's pooled out-of-fold predictions, with bootstrap intervals."""
    labels = np.array([r["label"] for r in rows])
    probabilities = np.stack([r["probabilities"] for r in rows])
    decided = np.array([r["decided"] for r in rows])
    groups = [r["group"] for r in rows] if any(r["group"] for r in rows) else None
    metrics = compute_metrics(labels, probabilities, class_names)
    settings = config.eval
    positive = class_names.index(settings.positive_class) if settings.positive_class in class_names else None
    result: dict[str, Any] = {"images": len(rows), "metrics": {k: metrics[k] for k in FOLD_METRICS if k in metrics}}
    if settings.bootstrap_resamples > 0:
        result["ci"] = bootstrap_metrics(labels, probabilities, groups=groups, positive=positive,
                                         n_resamples=settings.bootstrap_resamples, confidence=settings.confidence)
        if positive is not None and (settings.target_sensitivity or settings.target_specificity) and (decided >= 0).all():
            result["operating_point_ci"] = bootstrap_metrics(
                labels, probabilities, predicted=decided, groups=groups, positive=positive,
                n_resamples=settings.bootstrap_resamples, confidence=settings.confidence, with_auroc=False)
    return result


def _is_rate(name: str) -> bool:
    return not (name in UNBOUNDED or name.startswith(("nll", "brier")))


def _task_oof_rows(plans: list[FoldPlan], names: list[str], kind: str) -> list[dict[str, Any]]:
    """Every fold's test targets and scores (multi-label: decided by that fold's thresholds)."""
    rows = []
    for plan in plans:
        test = read_scored(plan.folder / PREDICTIONS_FILE, names)["test"]
        task_state = json.loads((plan.folder / "task.json").read_text()) if kind == "multilabel" else {}
        thresholds = np.asarray(task_state.get("thresholds", [0.5] * len(names)))
        for i, path in enumerate(test.paths):
            rows.append({"replicate": plan.replicate, "fold": plan.fold, "path": path,
                         "group": test.groups[i] if test.groups else "", "targets": test.targets[i],
                         "scores": test.scores[i], "decided": test.scores[i] >= thresholds})
    return rows


def write_task_oof(path: Path, rows: list[dict[str, Any]], names: list[str], kind: str) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        decided = ["labels_decided"] if kind == "multilabel" else []
        writer.writerow(["replicate", "fold", "path", "group", *(f"true_{n}" for n in names), *decided,
                         *(f"score_{n}" for n in names)])
        for row in rows:
            labels = [";".join(n for n, d in zip(names, row["decided"]) if d)] if kind == "multilabel" else []
            writer.writerow([row["replicate"], row["fold"], row["path"], row["group"],
                             *(f"{v:.9g}" for v in row["targets"]), *labels, *(f"{v:.6g}" for v in row["scores"])])


def pooled_task_metrics(rows: list[dict[str, Any]], names: list[str], kind: str, config: Config) -> dict[str, Any]:
    """Multi-label or regression metrics of one replicate's pooled out-of-fold predictions, with
    bootstrap intervals (whole groups resampled when known)."""
    targets = np.stack([r["targets"] for r in rows])
    scores = np.stack([r["scores"] for r in rows])
    groups = [r["group"] for r in rows] if any(r["group"] for r in rows) else None
    if kind == "multilabel":
        from vision_ft.tasks.multilabel import multilabel_metrics

        decided = np.stack([r["decided"] for r in rows])
        metric_rows = lambda w: multilabel_resampled(w, targets, scores, decided)  # noqa: E731
        point = {"map": multilabel_metrics(scores, targets, names, [0.5] * len(names))["map"]}  # threshold-free
    else:
        from vision_ft.tasks.regression import regression_metrics

        metric_rows = lambda w: regression_resampled(w, scores, targets)  # noqa: E731
        point = {"spearman": regression_metrics(scores, targets, names)["spearman"]}
    ones = metric_rows(np.ones((1, len(rows)), np.float32))
    point.update({name: (float(v[0]) if np.isfinite(v[0]) else None) for name, v in ones.items()})
    result: dict[str, Any] = {"images": len(rows), "metrics": point}
    settings = config.eval
    if settings.bootstrap_resamples > 0:
        result["ci"] = bootstrap_task_metrics(metric_rows, len(rows), groups, settings.bootstrap_resamples,
                                              settings.confidence)
    return result


def summarise(plans: list[FoldPlan], class_names: list[str], out: Path, config: Config) -> dict[str, Any]:
    """summary.json, oof_predictions.csv, report.md and folds.png from the finished folds."""
    from vision_ft.cv_report import plot_folds, write_cv_report

    kind = config.task
    rows = [_fold_row(plan, kind) for plan in plans]
    columns = [k for k in rows[0] if k not in ("replicate", "fold", "images", "best_epoch")]
    replicates = sorted({plan.replicate for plan in plans})
    if kind == "classification":
        oof = _oof_rows(plans, class_names)
        write_oof(out / "oof_predictions.csv", oof, class_names)
        pooled = {rep: pooled_metrics([r for r in oof if r["replicate"] == rep], class_names, config) for rep in replicates}
    else:
        oof = _task_oof_rows(plans, class_names, kind)
        write_task_oof(out / "oof_predictions.csv", oof, class_names, kind)
        pooled = {rep: pooled_task_metrics([r for r in oof if r["replicate"] == rep], class_names, kind, config)
                  for rep in replicates}
    summary: dict[str, Any] = {
        "task": kind, "folds": max(plan.fold for plan in plans), "replicates": replicates, "class_names": class_names,
        "group_by": config.data.group_by,
        "over_folds": {name: mean_interval([row.get(name) for row in rows], config.eval.confidence, _is_rate(name))
                       for name in columns},
        "per_fold": rows,
        "pooled_out_of_fold": pooled,
    }
    if len(replicates) > 1:
        summary["spread_over_replicates"] = {
            name: mean_interval([pooled[rep]["metrics"][name] for rep in replicates], config.eval.confidence)
            for name in TASK_FOLD_METRICS[kind] if all(pooled[rep]["metrics"].get(name) is not None for rep in replicates)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_folds(rows, out / "folds.png")
    write_cv_report(summary, out / "report.md", config)
    return summary
