"""report.md: a run summary a colleague can read without opening any other file."""

from __future__ import annotations

from typing import Any

from vision_ft import __version__
from vision_ft.config import Config
from vision_ft.evaluation.run_evaluation import report_section
from vision_ft.run_folder import RunFolder
from vision_ft.tta import views_of


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_report(run: RunFolder, config: Config, class_names: list[str], metrics: dict[str, Any], state: dict[str, Any],
                 notes: list[str] | None = None, task: Any = None) -> None:
    """report.md; `task` (a vision_ft.tasks Task) writes the metrics tables of its kind."""
    kind = getattr(task, "kind", "classification")
    noun = {"multilabel": "labels", "regression": "targets"}.get(kind, "classes")
    views = len(views_of(config.eval.tta))
    lines = [
        f"# vision-ft run `{run.root.name}`",
        "",
        f"- model: `{config.model.name}` (weights: `{config.model.weights}`), strategy `{config.finetune.strategy}`",
        f"- task: {kind}; data: `{config.data.path}`, {len(class_names)} {noun}: {', '.join(class_names)}",
        f"- input: {config.data.image_size} px, {config.data.channels} channel(s)",
        f"- epochs run: {state['epoch']} of {config.train.epochs}"
        + (" (stopped early)" if state.get("stopped_early") else "")
        + f"; best epoch {state['best_epoch']} by val {config.train.early_stopping.metric}"
        + (" (the weight average)" if state.get("best_weights") == "average" else ""),
        f"- test-time augmentation: {config.eval.tta}" + (f" ({views} mirrored views averaged; the ONNX model averages them too)"
                                                          if views > 1 else ""),
        f"- vision-ft {__version__}",
        "",
        "## Metrics (best checkpoint)",
        "",
    ]
    if task is not None and kind != "classification":
        lines += task.report_lines(metrics)
        lines += report_section(metrics)  # bootstrap confidence intervals
    else:
        lines += classification_table(metrics)
        lines += report_section(metrics)  # confidence intervals, calibration, operating points
    lines += [f"\n> **Warning:** {text}." for text in metrics.get("warnings", [])]
    if notes:
        lines += ["", "## Settings chosen for this data", "", *[f"- {note}" for note in notes]]
    if kind == "classification" and "test" in metrics:
        lines += ["", "## Per class (test)", "", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
        for name, row in metrics["test"]["per_class"].items():
            lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    lines += ["", "## Plots", ""]
    for png in sorted(run.plots.glob("*.png")):
        lines.append(f"![{png.stem}](plots/{png.name})")
    lines += [
        "",
        "## Files",
        "",
        "- `config.yaml`: the resolved config (rerun with `vision-ft train --config config.yaml`)",
        "- `split.json`: the exact train/val/test split",
        "- `metrics.jsonl`: one line per epoch; `metrics.json`: final val/test metrics",
        "- `checkpoints/best`, `checkpoints/last`: weights (safetensors) and state (JSON)",
    ]
    if kind != "classification":
        lines.append("- `task.json`: what the task chose on validation (multi-label thresholds) or learned from "
                     "training (target statistics)")
    if run.onnx.is_file():
        lines.append("- `model.onnx`: the best checkpoint for onnxruntime (`vision-ft predict model.onnx IMAGES`, "
                     "`vision_ft.runtime`), names, thresholds and preprocessing in its metadata")
    lines.append("")
    run.report.write_text("\n".join(lines))


def classification_table(metrics: dict[str, Any]) -> list[str]:
    """The val/test metrics table of a classification run, balanced metrics first."""
    lines = ["| split | balanced acc. | macro-F1 | ROC-AUC | accuracy | images |", "|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            lines.append(f"| {split} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['macro_f1'])} | {_fmt(m['auroc'])} "
                         f"| {_fmt(m['accuracy'])} | {m['num_samples']} |")
    return lines
