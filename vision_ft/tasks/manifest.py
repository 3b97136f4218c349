"""CSV manifests whose rows carry a vector target: several labels per image, or numeric values.

Multi-label: a ``labels`` column with zero or more labels separated by ``;`` (an empty cell is
an image with no finding), or one 0/1 column per label named by ``data.label_columns``.
Regression: a numeric ``target`` column, or several named by ``data.target_columns``.
Both: a ``path`` column (relative to the CSV's folder) and an optional ``split`` column.
Every problem is a one-line VisionFTError naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from vision_ft.data.discover import SPLIT_NAMES, DatasetIndex, Sample, is_image_file
from vision_ft.errors import VisionFTError
from vision_ft.tasks.postprocess import LABEL_SEPARATOR

Row = tuple[int, dict[str, str]]


def _read_rows(csv_path: Path, needed: list[str], what: str) -> tuple[dict[str, str], list[Row]]:
    if not csv_path.is_file() or csv_path.suffix.lower() != ".csv":
        raise VisionFTError(f"{csv_path}: {what} data is read from a CSV manifest; pass --data manifest.csv")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            rows = list(enumerate(reader, start=2))
    except UnicodeDecodeError as exc:
        raise VisionFTError(f"{csv_path} is not UTF-8 text ({exc.reason}); save the manifest as UTF-8 CSV") from None
    except csv.Error as exc:
        raise VisionFTError(f"{csv_path} is not a readable CSV file ({exc}); fix the manifest") from None
    missing = [c for c in ["path", *needed] if c.lower() not in columns]
    if missing:
        raise VisionFTError(
            f"{csv_path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} for {what} "
            f"(found: {', '.join(columns) or 'none'})"
        )
    return columns, rows


def _image_path(csv_path: Path, line: int, raw: str, seen: dict[Path, int]) -> Path:
    if not raw:
        raise VisionFTError(f"{csv_path} line {line}: empty path; every row needs one")
    path = Path(os.path.normpath(csv_path.parent / raw))
    if path in seen:
        raise VisionFTError(f"{csv_path} line {line}: {raw} is already listed on line {seen[path]}; list each image once")
    seen[path] = line
    if not path.is_file():
        raise VisionFTError(f"{csv_path} line {line}: image {raw} not found; paths are relative to {csv_path.parent}")
    if not is_image_file(path):
        raise VisionFTError(f"{csv_path} line {line}: {raw} is not an image file")
    return path


def _split_of(csv_path: Path, line: int, row: dict[str, str], columns: dict[str, str]) -> str | None:
    if "split" not in columns:
        return None
    split = (row.get(columns["split"]) or "").strip().lower()
    if split not in SPLIT_NAMES:
        raise VisionFTError(f"{csv_path} line {line}: split {split!r} is not one of train, val, test; fix the split column")
    return split


def _index(csv_path: Path, names: list[str], entries: list[tuple[Path, tuple[float, ...], str | None]]) -> DatasetIndex:
    if not entries:
        raise VisionFTError(f"{csv_path} lists no images; add rows")
    samples = [Sample(path, 0, target) for path, target, _ in entries]
    presplit = None
    if any(split is not None for _, _, split in entries):
        presplit = {}
        for sample, (_, _, split) in zip(samples, entries):
            presplit.setdefault(split or "train", []).append(sample)
        if "train" not in presplit:
            raise VisionFTError(f"{csv_path} has no rows with split 'train'; mark the training images as train")
        presplit = {name: presplit[name] for name in SPLIT_NAMES if name in presplit}
    return DatasetIndex(root=csv_path.parent, class_names=names, samples=samples, presplit=presplit)


def read_multilabel_manifest(csv_path: Path, label_columns: list[str] | None = None,
                             known: list[str] | None = None) -> DatasetIndex:
    """Samples with one 0/1 per label; the label set is every label named (sorted), or `known`.

    With `known` (the labels of a trained run) a label outside that set is an error.
    """
    csv_path = Path(csv_path)
    needed = list(label_columns) if label_columns else ["labels"]
    columns, rows = _read_rows(csv_path, needed, "multi-label")
    seen: dict[Path, int] = {}
    raw: list[tuple[Path, set[str], str | None]] = []
    for line, row in rows:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        path = _image_path(csv_path, line, (row.get(columns["path"]) or "").strip(), seen)
        if label_columns:
            present = set()
            for name in label_columns:
                value = (row.get(columns[name.lower()]) or "").strip()
                if value not in ("0", "1"):
                    raise VisionFTError(f"{csv_path} line {line}: column {name} holds {value!r}; label columns hold 0 or 1")
                if value == "1":
                    present.add(name)
        else:
            cell = row.get(columns["labels"]) or ""
            present = {label.strip() for label in cell.split(LABEL_SEPARATOR) if label.strip()}
        if known is not None and not present <= set(known):
            unknown = sorted(present - set(known))[0]
            raise VisionFTError(
                f"{csv_path} line {line}: label {unknown!r} is not one the run was trained on ({', '.join(known)}); "
                "remove it or train a new run"
            )
        raw.append((path, present, _split_of(csv_path, line, row, columns)))
    names = list(known) if known is not None else (list(label_columns) if label_columns else sorted(set().union(*(s for _, s, _ in raw))))
    if known is None and len(names) < 1:
        raise VisionFTError(f"{csv_path} names no labels at all; fill the labels column (labels separated by ';')")
    entries = [(path, tuple(1.0 if name in present else 0.0 for name in names), split) for path, present, split in raw]
    return _index(csv_path, names, entries)


def read_regression_manifest(csv_path: Path, target_columns: list[str] | None = None) -> DatasetIndex:
    """Samples with one float per target column (default: the ``target`` column)."""
    csv_path = Path(csv_path)
    names = list(target_columns) if target_columns else ["target"]
    columns, rows = _read_rows(csv_path, names, "regression")
    seen: dict[Path, int] = {}
    entries = []
    for line, row in rows:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        path = _image_path(csv_path, line, (row.get(columns["path"]) or "").strip(), seen)
        values = []
        for name in names:
            text = (row.get(columns[name.lower()]) or "").strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise VisionFTError(
                    f"{csv_path} line {line}: target {name} is {text!r}, not a finite number; fix the value or drop the row"
                )
            values.append(value)
        entries.append((path, tuple(values), _split_of(csv_path, line, row, columns)))
    return _index(csv_path, names, entries)
