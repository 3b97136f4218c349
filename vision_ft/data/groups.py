"""Groups (patients, wafers, production lots): images that must stay together in one split.

Images of one patient are not independent. When some sit in train and some in test, the test
score measures memory of the patient, not the disease. `data.group_by` names each image's
group, either

* a column of the CSV manifest (e.g. ``patient_id``), or
* a regular expression with a named group ``group``, searched in the image's path relative to
  the data root (e.g. ``'(?P<group>P\\d+)_'`` for ``pneumonia/P0123_2.png``).

Splits and cross-validation folds are then stratified by class *and* grouped (scikit-learn's
StratifiedGroupKFold): no group is in two parts, and each part keeps the class proportions
as closely as whole groups allow. A pre-split dataset whose groups cross splits is refused
(or, with `data.allow_group_leak`, warned about).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from vision_ft.data.discover import DatasetIndex, Sample
from vision_ft.errors import VisionFTError

log = logging.getLogger("vision_ft")


def _csv_column(csv_path: Path, wanted: str) -> dict[Path, str] | None:
    """{image path: value} of column `wanted` (any case), or None when the manifest has no such column."""
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
        if wanted.strip().lower() not in columns or "path" not in columns:
            return None
        column, path_column = columns[wanted.strip().lower()], columns["path"]
        values = {}
        for line, row in enumerate(reader, start=2):
            raw_path = (row.get(path_column) or "").strip()
            if not raw_path:
                continue
            value = (row.get(column) or "").strip()
            if not value:
                raise VisionFTError(f"{csv_path} line {line}: empty {column!r} for {raw_path}; every image needs a group")
            values[Path(os.path.normpath(csv_path.parent / raw_path))] = value
    return values


def _relative_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def assign_groups(index: DatasetIndex, group_by: str, source: Path | str) -> dict[Path, str]:
    """{image path: group} for every sample of `index`; `source` is what `discover` was given."""
    source = Path(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        by_column = _csv_column(source.resolve(), group_by)
        if by_column is not None:
            return {s.path: by_column[s.path] for s in index.samples}
    try:
        pattern = re.compile(group_by)
    except re.error as exc:
        pattern = None
        problem = f"not a valid regular expression ({exc})"
    else:
        problem = "" if "group" in pattern.groupindex else "a regular expression without a named group (?P<group>...)"
    if pattern is None or problem:
        where = f"a column of {source.name} nor " if source.suffix.lower() == ".csv" else ""
        raise VisionFTError(
            f"data.group_by {group_by!r} is neither {where}a usable pattern: {problem}; use e.g. "
            "'(?P<group>P\\d+)_' to take the patient id from file names"
        )
    groups = {}
    for sample in index.samples:
        relative = _relative_path(sample.path, Path(index.root))
        found = pattern.search(relative)
        if not found or not found.group("group"):
            raise VisionFTError(
                f"data.group_by {group_by!r} does not match {relative}; every image path needs a group "
                "(fix the pattern or rename the file)"
            )
        groups[sample.path] = found.group("group")
    return groups


def check_group_leak(splits: dict[str, list[Sample]], groups: dict[Path, str], allow: bool) -> list[str]:
    """Groups found in more than one split: an error, or with `allow` a warning. Returns them."""
    seen: dict[str, str] = {}
    leaking: dict[str, tuple[str, str]] = {}
    for name, samples in splits.items():
        for sample in samples:
            group = groups[sample.path]
            first = seen.setdefault(group, name)
            if first != name and group not in leaking:
                leaking[group] = (first, name)
    if leaking:
        group, (first, second) = next(iter(leaking.items()))
        message = (f"group {group!r} has images in both {first} and {second} "
                   f"({len(leaking)} group{'s' if len(leaking) > 1 else ''} cross splits)")
        if not allow:
            raise VisionFTError(
                f"{message}: its test score would be inflated; move the group's images into one split, "
                "or set data.allow_group_leak=true to accept it"
            )
        log.warning("%s; kept because data.allow_group_leak is true", message)
    return sorted(leaking)


def stratified_folds(samples: list[Sample], groups: dict[Path, str] | None, n_folds: int, seed: int,
                     what: str = "folds") -> list[np.ndarray]:
    """Index arrays of `n_folds` disjoint parts of `samples`, stratified by class, grouped when
    `groups` is given. Deterministic for a seed; the parts cover every sample exactly once."""
    labels = np.array([s.label for s in samples])
    unit_count = len(set(groups[s.path] for s in samples)) if groups else len(samples)
    unit = "groups" if groups else "images"
    if unit_count < n_folds:
        raise VisionFTError(f"{unit_count} {unit} cannot make {n_folds} {what}; need at least {n_folds} {unit}")
    placeholder = np.zeros(len(samples))
    with warnings.catch_warnings():
        # "The least populated class has only k members": handled, each fold gets what there is.
        warnings.simplefilter("ignore", UserWarning)
        if groups:
            ids = np.array([groups[s.path] for s in samples])
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            return [held for _, held in splitter.split(placeholder, labels, ids)]
        smallest = np.bincount(labels).min()
        if smallest < n_folds:
            raise VisionFTError(f"a class has only {smallest} images, too few for {n_folds} {what}; use fewer folds")
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [held for _, held in splitter.split(placeholder, labels)]


def hold_out(samples: list[Sample], groups: dict[Path, str] | None, fraction: float, seed: int,
             what: str) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): about `fraction` of the samples, whole groups, stratified by class.

    The held-out part is one fold of round(1 / fraction) grouped stratified folds, so 0.15
    holds out 1/7 = 14 % (the achieved proportions are logged and saved in split.json); with
    fewer groups than that, one group's share.
    """
    if fraction <= 0:
        return list(samples), []
    ordered = sorted(samples, key=lambda s: str(s.path))  # independent of discovery order
    units = len({groups[s.path] for s in ordered}) if groups else len(ordered)
    # With fewer groups than parts, hold out one of as many parts as there are groups (a larger share).
    parts = max(2, min(round(1 / fraction), units))
    held_index = stratified_folds(ordered, groups, parts, seed, what)[0]
    held = set(held_index.tolist())
    return ([s for i, s in enumerate(ordered) if i not in held], [ordered[i] for i in sorted(held)])


def class_proportions(splits: dict[str, list[Sample]], class_names: list[str]) -> dict[str, dict[str, float]]:
    """{split: {class: fraction of the split's images}}, to compare the achieved stratification."""
    table = {}
    for name, samples in splits.items():
        counts = np.bincount([s.label for s in samples], minlength=len(class_names))
        total = max(1, counts.sum())
        table[name] = {c: round(float(n) / float(total), 4) for c, n in zip(class_names, counts)}
    return table
