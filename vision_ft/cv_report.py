"""CV/report.md and CV/folds.png: the cross-validation summary a reviewer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vision_ft.config import Config
from vision_ft.evaluation.bootstrap import format_with_ci


def _mean_sd_ci(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["sd"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f} ({entry['low']:.3f}–{entry['high']:.3f})"


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def cv_table(summary: dict[str, Any]) -> list[str]:
    """Markdown: one row per metric, mean ± sd over folds (95% CI of the mean), pooled OOF with bootstrap CI."""
    first = summary["pooled_out_of_fold"][summary["replicates"][0]]
    pooled_ci = {**first.get("ci", {}), **{f"{k}_at_threshold": v for k, v in first.get("operating_point_ci", {}).items()}}
    lines = ["| metric | mean ± sd over folds (95% CI) | pooled out-of-fold (95% bootstrap CI) |", "|---|---|---|"]
    for name, entry in summary["over_folds"].items():
        if name.endswith("_uncalibrated") or entry["mean"] is None:
            continue
        pooled = pooled_ci.get(name)
        value = first["metrics"].get(name, pooled["value"] if pooled else None)
        lines.append(f"| {name} | {_mean_sd_ci(entry)} | {format_with_ci(value, pooled) if pooled or value is not None else ''} |")
    return lines


def write_cv_report(summary: dict[str, Any], path: Path, config: Config) -> None:
    replicates = summary["replicates"]
    rows = summary["per_fold"]
    lines = [
        f"# Cross-validation: {summary['folds']} folds, {len(replicates)} replicate(s)",
        "",
        f"- task: {summary.get('task', 'classification')}; data: `{config.data.path}`, "
        f"{ {'multilabel': 'labels', 'regression': 'targets'}.get(summary.get('task'), 'classes')}: "
        f"{', '.join(summary['class_names'])}",
        f"- model: `{config.model.name}` (weights `{config.model.weights}`), {config.data.image_size} px, "
        f"{config.train.epochs} epochs max",
        f"- grouped by: `{summary['group_by']}`" if summary["group_by"] else "- not grouped (every image its own unit)",
        "- each fold is a run folder (`fold-k/`): fold k is its test set, validation is carved from the rest",
        "",
        "## Summary",
        "",
        *cv_table(summary),
        "",
        "Intervals over folds are t-intervals of the mean (folds share training data, so they describe the spread "
        "rather than guarantee coverage); pooled intervals are percentile bootstraps over the out-of-fold "
        "predictions (`oof_predictions.csv`)"
        + (", stratified by class" if summary.get("task", "classification") == "classification" else "")
        + (", resampling groups." if summary["group_by"] else "."),
    ]
    if "spread_over_replicates" in summary:
        lines += ["", "## Spread over replicates (seeds / repeats), pooled metrics", "",
                  "| metric | mean ± sd (95% CI) |", "|---|---|"]
        lines += [f"| {k} | {_mean_sd_ci(v)} |" for k, v in summary["spread_over_replicates"].items()]
    columns = [k for k in rows[0] if not k.endswith("_uncalibrated") and k != "replicate"]
    lines += ["", "## Per fold", "", "| replicate | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['replicate']} | " + " | ".join(_cell(row.get(k)) for k in columns) + " |")
    lines += ["", "![per-fold metrics](folds.png)", ""]
    path.write_text("\n".join(lines))


def plot_folds(rows: list[dict[str, Any]], path: Path) -> None:
    """Each fold's test metrics as dots, with the mean as a bar, one column per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece_calibrated",
                         "sensitivity_at_threshold", "specificity_at_threshold", "macro_auroc", "map", "micro_auroc",
                         "micro_f1", "r2", "pearson", "spearman") if any(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    for x, name in enumerate(names):
        values = np.array([r[name] for r in rows if r.get(name) is not None], dtype=float)
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x + jitter, values, s=18, alpha=0.8)
        ax.hlines(values.mean(), x - 0.3, x + 0.3, color="black")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    lowest = min((r[n] for r in rows for n in names if r.get(n) is not None), default=0.0)
    ax.set_ylim(min(0.0, lowest - 0.02), 1.02)  # R² can be negative
    ax.set_title(f"test metrics per fold ({len(rows)} runs); bar = mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
