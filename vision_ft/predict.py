"""`vision-ft predict`: the images to label and the CSV of labels, shared by a run folder's
predictions (`run_predict.py`) and an exported model's (`onnx_predict.py`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from vision_ft.data.discover import IMAGE_SUFFIXES
from vision_ft.decision import DecisionRule
from vision_ft.errors import VisionFTError
from vision_ft.runtime import mark_uncertain


def collect_images(path: Path) -> list[Path]:
    """One image, or every image below a folder (sorted, so outputs are stable)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise VisionFTError(f"{path} does not exist; pass an image file or a folder of images")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise VisionFTError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def prediction_header(top_k: int) -> list[str]:
    """CSV columns shared by every predict path (run folder or ONNX model)."""
    header = ["path", "label", "score"]
    for k in range(1, top_k + 1):
        header += [f"top{k}_label", f"top{k}_score"]
    return header


def prediction_rows(paths: list[Path], probs: np.ndarray, class_names: list[str], top_k: int,
                    rule: DecisionRule | None = None, threshold: float | None = None) -> list[list[str]]:
    """One CSV row per image: label by the decision rule (operating thresholds, `threshold` reject
    band), score = top-1 probability, then the top-k labels and probabilities."""
    labels = mark_uncertain(probs, class_names, threshold, rule)
    rows = []
    for path, p, label in zip(paths, probs, labels):
        order = np.argsort(-p)[:top_k]
        row = [str(path), label, f"{p[order[0]]:.6f}"]
        for idx in order:
            row += [class_names[idx], f"{p[idx]:.6f}"]
        rows.append(row)
    return rows


def write_predictions_csv(out: Path, header: list[str], rows: list[list[str]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
