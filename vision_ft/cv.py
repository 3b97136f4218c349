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
from typing import Any

import numpy as np
from scipy import stats

from vision_ft.config import Config
from vision_ft.data.discover import Sample, discover
from vision_ft.data.groups import assign_groups, hold_out, stratified_folds
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.bootstrap import bootstrap_metrics
from vision_ft.evaluation.run_evaluation import PREDICTIONS_FILE, load_decision_rule, read_predictions
from vision_ft.metrics import compute_metrics

log = logging.getLogger("vision_ft")

CV_MARKER = ".vision-ft-cv"
FOLD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")
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
    lines = sorted(f"{s.path}\t{s.label}\t{groups[s.path] if groups else ''}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _write_manifest(path: Path, parts: dict[str, list[Sample]], class_names: list[str],
                    groups: dict[Path, str] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", *(["group"] if groups else [])])
        for split, samples in parts.items():
            for s in samples:
                writer.writerow([str(s.path), class_names[s.label], split, *([groups[s.path]] if groups else [])])


def plan_folds(config: Config, out: Path, folds: int, repeats: int, seeds: list[int]) -> tuple[list[FoldPlan], list[str]]:
    """Fold assignments and their manifests (rewritten identically on resume); class names."""
    if folds < 2:
        raise VisionFTError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if repeats < 1:
        raise VisionFTError(f"--repeats {repeats} must be at least 1")
    if not config.data.path:
        raise VisionFTError("no data given; pass --data DIR (a folder of class folders, or a CSV manifest)")
    index = discover(Path(config.data.path))
    groups = assign_groups(index, config.data.group_by, config.data.path) if config.data.group_by else None
    samples = sorted(index.samples, key=lambda s: str(s.path))  # pre-split data is pooled: CV re-splits it
    fingerprint = _data_fingerprint(samples, groups)
    plan_file = out / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        raise VisionFTError(f"{out} holds a CV of other data (images, labels or groups changed); use another --out or --force")
    plans = []
    for seed in seeds:
        for repeat in range(repeats):
            held = stratified_folds(samples, groups, folds, config.data.split_seed + repeat, what="folds")
            for k, test_index in enumerate(held, start=1):
                test_set = set(test_index.tolist())
                rest = [s for i, s in enumerate(samples) if i not in test_set]
                train, val = hold_out(rest, groups, config.data.val_fraction, config.data.split_seed + repeat,
                                      "parts for a validation split")
                parent = out / (f"seed-{seed}" if len(seeds) > 1 else "") / (f"repeat-{repeat + 1}" if repeats > 1 else "")
                plan = FoldPlan(seed, repeat + 1, k, parent / f"fold-{k}",
                                out / "manifests" / f"{str(parent.relative_to(out)).replace('/', '-').strip('.-') or 'cv'}-fold-{k}.csv")
                _write_manifest(plan.manifest, {"train": train, "val": val, "test": [samples[i] for i in sorted(test_set)]},
                                index.class_names, groups)
                plans.append(plan)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint, "folds": folds, "repeats": repeats, "seeds": seeds,
                                     "group_by": config.data.group_by}, indent=1))
    return plans, list(index.class_names)


# ------------------------------------------------------------------ running


def _fold_config(config: Config, plan: FoldPlan, grouped: bool) -> Config:
    tree = config.model_dump(mode="json")
    tree["data"]["path"] = str(plan.manifest)
    tree["data"]["group_by"] = "group" if grouped else None  # the manifest's column
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
) -> CVResult:
    """Run (or resume) a k-fold cross-validation into `out`; see the module docstring."""
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
        run_fold(_fold_config(config, plan, bool(config.data.group_by)), plan)
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


def _fold_row(plan: FoldPlan) -> dict[str, Any]:
    metrics = json.loads((plan.folder / "metrics.json").read_text())
    row: dict[str, Any] = {"replicate": plan.replicate, "fold": plan.fold, "images": metrics["test"]["num_samples"],
                           "best_epoch": metrics.get("best_epoch")}
    row.update({name: metrics["test"].get(name) for name in FOLD_METRICS})
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
    return not (name in ("loss", "temperature", "threshold") or name.startswith(("nll", "brier")))


def summarise(plans: list[FoldPlan], class_names: list[str], out: Path, config: Config) -> dict[str, Any]:
    """summary.json, oof_predictions.csv, report.md and folds.png from the finished folds."""
    from vision_ft.cv_report import plot_folds, write_cv_report

    rows = [_fold_row(plan) for plan in plans]
    columns = [k for k in rows[0] if k not in ("replicate", "fold", "images", "best_epoch")]
    oof = _oof_rows(plans, class_names)
    write_oof(out / "oof_predictions.csv", oof, class_names)
    replicates = sorted({plan.replicate for plan in plans})
    pooled = {rep: pooled_metrics([r for r in oof if r["replicate"] == rep], class_names, config) for rep in replicates}
    summary: dict[str, Any] = {
        "folds": max(plan.fold for plan in plans), "replicates": replicates, "class_names": class_names,
        "group_by": config.data.group_by,
        "over_folds": {name: mean_interval([row.get(name) for row in rows], config.eval.confidence, _is_rate(name))
                       for name in columns},
        "per_fold": rows,
        "pooled_out_of_fold": pooled,
    }
    if len(replicates) > 1:
        summary["spread_over_replicates"] = {
            name: mean_interval([pooled[rep]["metrics"][name] for rep in replicates], config.eval.confidence)
            for name in FOLD_METRICS if all(pooled[rep]["metrics"].get(name) is not None for rep in replicates)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_folds(rows, out / "folds.png")
    write_cv_report(summary, out / "report.md", config)
    return summary
