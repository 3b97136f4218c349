"""A run's evaluation after training: predictions file, calibration, operating point, intervals.

Training hands over the best checkpoint's logits on val and test; everything else happens here,
on numpy arrays:

1. `predictions.csv` in the run folder: split, path, group, label and one logit per class, so
   cross-validation, research scripts and `eval` can recompute anything without the model;
2. the decision rule (`decision.json`): a temperature fitted on val (`calibration.temperature`),
   and a threshold for `eval.target_sensitivity` / `target_specificity` (binary) or per-class
   thresholds for `eval.target_recall`, all chosen on val;
3. test metrics with percentile-bootstrap intervals (`test_ci`), calibration before and after
   (ECE, Brier, NLL), the operating point's rates with intervals, and plots (reliability
   diagram, ROC and precision-recall curves).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.config import Config, EvalConfig
from vision_ft.decision import DecisionRule, calibrated_softmax, log_softmax
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.bootstrap import CONFUSION_METRICS, bootstrap_metrics, format_with_ci
from vision_ft.evaluation.calibration import calibration_measures, choose_temperature, plot_reliability
from vision_ft.evaluation.operating_point import (
    binary_rates,
    class_recall_thresholds,
    plot_roc_pr,
    threshold_for_sensitivity,
    threshold_for_specificity,
)

PREDICTIONS_FILE = "predictions.csv"
DECISION_FILE = "decision.json"


@dataclass
class SplitPredictions:
    """One split's model outputs, in the order of `paths`."""

    logits: np.ndarray  # N x K
    labels: np.ndarray  # N
    paths: list[str]
    groups: list[str] | None = None


def check_eval_config(settings: EvalConfig, class_names: list[str]) -> None:
    """Raise VisionFTError, before any training, when eval.* names unknown classes or does not fit the task."""
    named = ([settings.positive_class] if settings.positive_class else []) + list(settings.target_recall or {})
    for name in named:
        if name not in class_names:
            raise VisionFTError(f"eval: class {name!r} is not one of the data's classes ({', '.join(class_names)})")
    wants_threshold = settings.target_sensitivity is not None or settings.target_specificity is not None
    if wants_threshold and len(class_names) != 2:
        raise VisionFTError(
            f"eval.target_sensitivity/target_specificity need a binary task, this one has {len(class_names)} classes; "
            "use eval.target_recall: {class: recall} for multi-class thresholds"
        )
    if wants_threshold and settings.positive_class is None:
        raise VisionFTError(f"eval.target_sensitivity/target_specificity need eval.positive_class (one of {', '.join(class_names)})")


def positive_index(settings: EvalConfig, class_names: list[str]) -> int | None:
    return class_names.index(settings.positive_class) if settings.positive_class in class_names else None


def choose_decision_rule(config: Config, class_names: list[str], val: SplitPredictions) -> tuple[DecisionRule, dict[str, Any]]:
    """Temperature and thresholds, all chosen on the validation split."""
    temperature, calibration = choose_temperature(config.calibration.temperature, val.logits, val.labels)
    probabilities = calibrated_softmax(val.logits, temperature)
    settings = config.eval
    positive = positive_index(settings, class_names)
    threshold, target = None, None
    if positive is not None and settings.target_sensitivity is not None:
        target = {"sensitivity": settings.target_sensitivity}
        threshold = threshold_for_sensitivity(val.labels == positive, probabilities[:, positive], settings.target_sensitivity)
    elif positive is not None and settings.target_specificity is not None:
        target = {"specificity": settings.target_specificity}
        threshold = threshold_for_specificity(val.labels == positive, probabilities[:, positive], settings.target_specificity)
    class_thresholds = {}
    if settings.target_recall:
        targets = {class_names.index(name): recall for name, recall in settings.target_recall.items()}
        class_thresholds = class_recall_thresholds(val.labels, probabilities, targets)
    rule = DecisionRule(temperature, positive if threshold is not None else None, threshold, class_thresholds)
    info: dict[str, Any] = {"calibration": calibration}
    if threshold is not None:
        info["operating_point"] = {"positive_class": class_names[positive], "target": target, "threshold": threshold,
                                   "val": binary_rates(val.labels == positive, probabilities[:, positive] >= threshold)}
    return rule, info


def evaluate_test(rule: DecisionRule, test: SplitPredictions, class_names: list[str], settings: EvalConfig,
                  plots: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Test-split calibration, intervals and operating point under `rule`; writes plots when given a folder."""
    before = calibrated_softmax(test.logits, 1.0)
    after = rule.probabilities(test.logits)
    out: dict[str, Any] = {"calibration_test": {"before": calibration_measures(before, test.labels),
                                                "after": calibration_measures(after, test.labels),
                                                "temperature": rule.temperature}}
    positive = positive_index(settings, class_names)
    if settings.bootstrap_resamples > 0:
        # Log-probabilities rank the images as the probabilities do, without the ties a small
        # temperature makes when confident images' probabilities all round to exactly 1.0.
        out["test_ci"] = bootstrap_metrics(test.labels, log_softmax(test.logits), groups=test.groups, positive=positive,
                                           n_resamples=settings.bootstrap_resamples, confidence=settings.confidence,
                                           seed=seed)
    decided = rule.decide(after)
    if rule.positive_threshold is not None:
        rates = binary_rates(test.labels == rule.positive_class, decided == rule.positive_class)
        if settings.bootstrap_resamples > 0:
            rates = bootstrap_metrics(test.labels, after, predicted=decided, groups=test.groups,
                                      positive=rule.positive_class, n_resamples=settings.bootstrap_resamples,
                                      confidence=settings.confidence, seed=seed, with_auroc=False)
        out["operating_point_test"] = rates
    if rule.class_thresholds:
        out["class_thresholds_test"] = {
            "uncertain_fraction": float(np.mean(decided < 0)),
            "recall": {class_names[k]: float(np.mean(decided[test.labels == k] == k)) if np.any(test.labels == k) else None
                       for k in rule.class_thresholds},
        }
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        plot_reliability(before, after if rule.temperature != 1.0 else None, test.labels, plots / "reliability_test.png",
                         f"test split, temperature {rule.temperature:.2f}")
        if len(class_names) == 2:
            shown = 1 if positive is None else positive
            plot_roc_pr(test.labels == shown, after[:, shown], plots, class_names[shown], rule.positive_threshold)
    return out


def write_predictions(path: Path, predictions: dict[str, SplitPredictions], class_names: list[str]) -> None:
    """CSV: split, path, group, label (class name), one logit column per class."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "path", "group", "label", *(f"logit_{name}" for name in class_names)])
        for split, part in predictions.items():
            for i, (row_path, label) in enumerate(zip(part.paths, part.labels)):
                group = part.groups[i] if part.groups else ""
                writer.writerow([split, row_path, group, class_names[int(label)], *(f"{v:.7g}" for v in part.logits[i])])


def read_predictions(path: Path, class_names: list[str]) -> dict[str, SplitPredictions]:
    """Inverse of `write_predictions`."""
    rows: dict[str, list[list[str]]] = {}
    with Path(path).open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            rows.setdefault(row[0], []).append(row)
    out = {}
    for split, part in rows.items():
        groups = [r[2] for r in part]
        out[split] = SplitPredictions(
            logits=np.array([[float(v) for v in r[4:]] for r in part]),
            labels=np.array([class_names.index(r[3]) for r in part]),
            paths=[r[1] for r in part],
            groups=groups if any(groups) else None,
        )
    return out


def evaluate_run_predictions(run_root: Path, config: Config, class_names: list[str],
                             predictions: dict[str, SplitPredictions]) -> dict[str, Any]:
    """Write predictions.csv and decision.json, return the additions to metrics.json (see module doc)."""
    write_predictions(run_root / PREDICTIONS_FILE, predictions, class_names)
    if "val" not in predictions:
        rule, info = DecisionRule(), {}
    else:
        rule, info = choose_decision_rule(config, class_names, predictions["val"])
    (run_root / DECISION_FILE).write_text(json.dumps(rule.to_json(class_names), indent=1))
    if "test" in predictions:
        info.update(evaluate_test(rule, predictions["test"], class_names, config.eval, run_root / "plots",
                                  seed=config.train.seed))
    return info


def load_decision_rule(run_root: Path, class_names: list[str]) -> DecisionRule:
    """The run's decision.json, or the plain softmax + argmax for runs made before it existed."""
    path = Path(run_root) / DECISION_FILE
    if not path.is_file():
        return DecisionRule()
    try:
        return DecisionRule.from_json(json.loads(path.read_text()), class_names)
    except (ValueError, TypeError, AttributeError) as exc:
        raise VisionFTError(f"{path} is malformed ({exc}); restore it or delete it to use plain argmax") from None


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Human lines for the CLI and the report: test metrics with CIs, calibration, operating point."""
    lines = []
    ci = metrics.get("test_ci") or {}
    test = metrics.get("test") or {}
    if ci:
        # Classification's headline metrics first; other tasks show their own (macro_auroc, rmse, ...).
        names = [name for name in (*CONFUSION_METRICS, "auroc") if name in ci] or list(ci)
        shown = [f"{name} {format_with_ci(test.get(name, ci[name]['value']), ci[name])}" for name in names]
        lines.append("test (95% CI): " + "  ".join(shown))
    calibration = metrics.get("calibration_test")
    if calibration:
        b, a = calibration["before"], calibration["after"]
        lines.append(f"calibration (test), temperature {calibration['temperature']:.3f}: ECE {b['ece']:.3f} -> {a['ece']:.3f}, "
                     f"Brier {b['brier']:.3f} -> {a['brier']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}")
    point = metrics.get("operating_point")
    rates = metrics.get("operating_point_test")
    if point and rates:
        target = ", ".join(f"{k} {v:g}" for k, v in point["target"].items())
        shown = [f"{name} {format_with_ci(r['value'], r) if isinstance(r, dict) else format_with_ci(r, None)}"
                 for name, r in rates.items() if name in ("sensitivity", "specificity", "ppv", "npv", "f1")]
        lines.append(f"operating point ({point['positive_class']} positive, {target} on val, threshold "
                     f"{point['threshold']:.4f}), test: " + "  ".join(shown))
    thresholds = metrics.get("class_thresholds_test")
    if thresholds:
        recall = ", ".join(f"{k} {v:.3f}" for k, v in thresholds["recall"].items() if v is not None)
        lines.append(f"per-class thresholds, test: recall {recall}; uncertain {thresholds['uncertain_fraction']:.1%}")
    return lines


def report_section(metrics: dict[str, Any]) -> list[str]:
    """report.md lines: test metrics with confidence intervals, calibration, operating point."""
    ci = metrics.get("test_ci")
    if not ci and not metrics.get("calibration_test"):
        return []
    lines = ["", "## Test split: confidence intervals, calibration, operating point", ""]
    if ci:
        lines += ["| metric | test (95% CI, percentile bootstrap) |", "|---|---|"]
        lines += [f"| {name} | {format_with_ci(value['value'], value)} |" for name, value in ci.items()]
        lines.append("")
    lines += [f"- {line}" for line in summary_lines(metrics)[1:]]
    return lines
