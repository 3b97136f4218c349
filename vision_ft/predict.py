"""`vision-ft predict`: the images to label and the CSV of labels, shared by a run folder's
predictions (`run_predict.py`) and an exported model's (`onnx_predict.py`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from vision_ft.data.decode import find_bad_images
from vision_ft.data.discover import IMAGE_SUFFIXES, is_image_file
from vision_ft.data.pixel_policy import PixelPolicy
from vision_ft.decision import DecisionRule
from vision_ft.errors import VisionFTError
from vision_ft.runtime import ERROR, NON_FINITE


def collect_images(path: Path) -> list[Path]:
    """One image, or every image below a folder (sorted, so outputs are stable)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise VisionFTError(f"{path} does not exist; pass an image file or a folder of images")
    images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    if not images:
        raise VisionFTError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def prediction_header(top_k: int) -> list[str]:
    """CSV columns shared by every predict path (run folder or ONNX model). `error` is empty
    unless the image got no answer (label `error`): unreadable and skipped, or non-finite outputs."""
    header = ["path", "label", "score"]
    for k in range(1, top_k + 1):
        header += [f"top{k}_label", f"top{k}_score"]
    return header + ["error"]


def error_row(path: Path, reason: str, top_k: int) -> list[str]:
    """The CSV row of an image without an answer: label `error`, no scores, the reason last."""
    return [str(path), ERROR, "", *([""] * (2 * top_k)), reason]


def prediction_rows(paths: list[Path], probs: np.ndarray, class_names: list[str], top_k: int,
                    rule: DecisionRule | None = None, threshold: float | None = None,
                    skipped: dict[Path, str] | None = None) -> list[list[str]]:
    """One CSV row per image: label by the decision rule (operating thresholds, `threshold` reject
    band), score = top-1 probability, then the top-k labels and probabilities, then the error.
    `probs` holds a row per path not in `skipped` ({path: reason}), which get error rows."""
    skipped = skipped or {}
    labels = iter((rule or DecisionRule()).labels(probs, class_names, reject_below=threshold)) if len(probs) else iter(())
    answered = iter(probs)
    rows = []
    for path in paths:
        if path in skipped:
            rows.append(error_row(path, f"skipped: {skipped[path]}", top_k))
            continue
        p, label = next(answered), next(labels)
        if not np.all(np.isfinite(p)):
            rows.append(error_row(path, NON_FINITE, top_k))  # NaN must never become a label
            continue
        order = np.argsort(-p)[:top_k]
        row = [str(path), label, f"{p[order[0]]:.6f}"]
        for idx in order:
            row += [class_names[idx], f"{p[idx]:.6f}"]
        rows.append(row + [""])
    return rows


def task_prediction_rows(table: Callable[[list[Path], np.ndarray, int], tuple[list[str], list[list[str]]]],
                         paths: list[Path], scores: np.ndarray, top_k: int,
                         skipped: dict[Path, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a multi-label or regression model (`table`: the task's prediction table),
    in `paths` order, with an `error` column: unreadable images in `skipped` and images whose
    scores are not finite get an error row instead of a guess."""
    skipped = skipped or {}
    answered = [p for p in paths if p not in skipped]
    header, rows = table(answered, scores, top_k)
    # A multi-label row's second column is its label set ("error" there); regression rows only hold values.
    first = ERROR if header[1] == "labels" else ""

    def error_row(path: Path, reason: str) -> list[str]:
        return [str(path), first, *[""] * (len(header) - 2), reason]

    by_path: dict[Path, list[str]] = {}
    for path, row, values in zip(answered, rows, scores):
        by_path[path] = row + [""] if np.all(np.isfinite(values)) else error_row(path, NON_FINITE)
    for path, reason in skipped.items():
        by_path[path] = error_row(path, f"skipped: {reason}")
    return header + ["error"], [by_path[p] for p in paths]


def readable_images(images: list[Path], skip_bad: bool, workers: int = 2,
                    pixels: PixelPolicy | None = None) -> tuple[list[Path], dict[Path, str]]:
    """(images to predict, {unreadable image: reason}) under the model's pixel policy (DICOM frame,
    intensity); without `skip_bad` an unreadable image is an error."""
    bad = dict(find_bad_images(images, workers=workers, pixels=pixels))
    if bad and not skip_bad:
        path, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise VisionFTError(f"{path}: cannot decode image ({reason}){more}; remove it or pass --skip-bad-images "
                            "to list it in the output as an error")
    return [p for p in images if p not in bad], bad


def write_predictions_csv(out: Path, header: list[str], rows: list[list[str]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
