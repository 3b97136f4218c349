"""report.md of an anomaly run: what was fitted, the threshold and why, the metrics."""

from __future__ import annotations

from typing import Any

from vision_ft import __version__
from vision_ft.config import Config
from vision_ft.evaluation.bootstrap import format_with_ci
from vision_ft.run_folder import RunFolder


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_anomaly_report(run: RunFolder, config: Config, class_names: list[str], metrics: dict[str, Any],
                         state: dict[str, Any]) -> None:
    fit, threshold = state["fit"], state["threshold"]
    cfg = config.anomaly
    defects = [name for name in class_names if name != cfg.good_class]
    lines = [
        f"# vision-ft anomaly run `{run.root.name}`",
        "",
        f"- model: PatchCore-style, frozen `{config.model.name}` (weights: `{config.model.weights}`), "
        f"feature levels {fit['layers']}, {fit['feature_dim']}-dim patch features on a {fit['grid'][0]}×{fit['grid'][1]} grid",
        f"- data: `{config.data.path}`; fitted on '{cfg.good_class}' only; defect classes (val/test only): "
        f"{', '.join(defects) or 'none'}",
        f"- memory bank: {fit['bank_size']} patch features, a greedy coreset ({cfg.coreset_fraction:g}) of "
        f"{fit['patches_kept']} kept of {fit['patches_seen']} seen (covering radius {fit['coreset_radius']:.4g})",
        f"- input: {config.data.image_size} px, {config.data.channels} channel(s); vision-ft {__version__}",
        "",
        "## Threshold",
        "",
        f"Rule `{threshold['rule']}`: {threshold['reason']}.",
        "",
        f"Scores are normalised as sigmoid((raw − {threshold['raw']:.4g}) / {threshold['scale']:.4g}), so the shipped "
        f"model's threshold is 0.5; scores within 0.5 ± {cfg.uncertain_band:g} are labelled 'uncertain'.",
        "",
        "## Metrics (image level, defective = positive)",
        "",
        "| split | AUROC | F1 | precision | recall | false-positive rate | good | defective | uncertain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            ci = m.get("ci", {})
            lines.append(f"| {split} | {format_with_ci(m['auroc'], ci.get('auroc'))} | {format_with_ci(m['f1'], ci.get('f1'))} "
                         f"| {format_with_ci(m['precision'], ci.get('precision'))} | {format_with_ci(m['recall'], ci.get('recall'))} "
                         f"| {_fmt(m['false_positive_rate'])} | {m['num_good']} | {m['num_defective']} | {m['uncertain']} |")
    if "test" in metrics and metrics["test"]["per_defect_class"]:
        lines += ["", "## Recall per defect class (test)", "", "| class | recall | images |", "|---|---|---|"]
        for name, row in metrics["test"]["per_defect_class"].items():
            lines.append(f"| {name} | {row['recall']:.3f} | {row['support']} |")
    if any("ci" in metrics.get(split, {}) for split in ("val", "test")):
        confidence = next(metrics[s]["ci_confidence"] for s in ("val", "test") if "ci" in metrics.get(s, {}))
        lines += ["", f"In brackets: {confidence:.0%} percentile-bootstrap intervals ({config.eval.bootstrap_resamples} "
                  "resamples, stratified by good/defective)."]
    lines += ["", "## Plots", ""]
    lines += [f"![{png.stem}](plots/{png.name})" for png in sorted(run.plots.glob("*.png"))]
    lines += ["", "## Files", "", "- `config.yaml`, `split.json`: the resolved config and the exact split",
              "- `metrics.json`: val/test metrics; `checkpoints/best`: backbone, memory bank, threshold (safetensors) "
              "and how they were fitted (`state.json`)"]
    if run.onnx.is_file():
        lines.append("- `model.onnx`: outputs `score` and `anomaly_map` (both normalised, 0.5 = threshold); "
                     "`vision-ft predict model.onnx IMAGES --heatmaps OUT`, or `vision_ft.runtime.load_model`")
    lines.append("")
    run.report.write_text("\n".join(lines))
