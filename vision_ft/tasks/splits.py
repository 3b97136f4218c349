"""Train/val/test splits for vector targets, stratified as well as the data allows.

Multi-label: iterative stratification (Sechidis et al. 2011, the `iterative-stratification`
package), which keeps every label's frequency close in each split, rare labels included.
Regression: samples are binned by quantiles of the first target and each bin is split on its
own, so every split covers the range of values. Deterministic for a seed; a pre-split manifest
keeps its splits and only the missing ones are carved out of train.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from vision_ft.data.discover import DatasetIndex, Sample
from vision_ft.data.split import _check_fractions, stratified_split
from vision_ft.errors import VisionFTError

Splitter = Callable[[list[Sample], float, float, int], dict[str, list[Sample]]]
_MAX_BINS = 10


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: str(s.path))


def _carve(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, carved) with `fraction` of `samples` carved out, label frequencies kept alike."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if fraction <= 0.0 or not samples:
        return samples, []
    targets = np.asarray([s.target for s in samples], dtype=np.int64)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    kept, carved = next(splitter.split(np.zeros(len(samples)), targets))
    return [samples[i] for i in sorted(kept)], [samples[i] for i in sorted(carved)]


def multilabel_split(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """Iteratively stratified train/val/test lists."""
    _check_fractions(val_fraction, test_fraction)
    wanted = 1 + (val_fraction > 0) + (test_fraction > 0)
    if len(samples) < wanted * 2:
        raise VisionFTError(f"{len(samples)} images are too few to split into train/val/test; add images "
                            "or set data.val_fraction / data.test_fraction to 0")
    rest, test = _carve(_sorted(samples), test_fraction, seed)
    # val's share of what remains after the test split is carved out.
    train, val = _carve(rest, val_fraction / (1.0 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}


def regression_split(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """Train/val/test lists stratified by quantile bins of the first target."""
    samples = _sorted(samples)
    values = np.asarray([s.target[0] for s in samples], dtype=np.float64)
    wanted = 1 + (val_fraction > 0) + (test_fraction > 0)
    bins = max(1, min(_MAX_BINS, len(samples) // (4 * wanted)))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    strata = np.searchsorted(edges, values, side="right")
    binned = [replace(s, label=int(b)) for s, b in zip(samples, strata)]
    return stratified_split(binned, val_fraction, test_fraction, seed)


def _pooled_target(members: list[Sample]) -> tuple[float, ...]:
    """A group's targets as one: per label, whether any image has it (multi-label, 0/1 targets);
    per target, the mean (regression). Rounded so the multi-label stratifier sees 0/1 again."""
    values = np.asarray([m.target for m in members], dtype=np.float64)
    binary = np.isin(values, (0.0, 1.0)).all()
    return tuple(values.max(axis=0) if binary else values.mean(axis=0))


def grouped(splitter: Splitter, groups: dict[Path, str]) -> Splitter:
    """`splitter` over whole groups (patients): each group is split as one sample carrying its
    pooled targets, then expanded back to its images, so no group spans two splits."""

    def split(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
        members: dict[str, list[Sample]] = {}
        for sample in samples:
            members.setdefault(groups[sample.path], []).append(sample)
        names = sorted(members)
        proxies = [Sample(Path(name), 0, _pooled_target(members[name])) for name in names]
        parts = splitter(proxies, val_fraction, test_fraction, seed)
        return {part: [s for proxy in chosen for s in members[str(proxy.path)]] for part, chosen in parts.items()}

    return split


def split_index(index: DatasetIndex, splitter: Splitter, val_fraction: float, test_fraction: float,
                seed: int, allow_group_leak: bool = False) -> dict[str, list[Sample]]:
    """The splits of `index`: the manifest's own when it has a split column, missing ones carved
    from train; with `index.groups` (data.group_by) whole groups go to one split."""
    if index.groups:
        from vision_ft.data.groups import check_group_leak

        splits = _split_index(index, grouped(splitter, index.groups), val_fraction, test_fraction, seed)
        check_group_leak(splits, index.groups, allow_group_leak)
        return splits
    return _split_index(index, splitter, val_fraction, test_fraction, seed)


def _split_index(index: DatasetIndex, splitter: Splitter, val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, list[Sample]]:
    if index.presplit is None:
        return splitter(index.samples, val_fraction, test_fraction, seed)
    given = index.presplit
    if "val" in given and "test" in given:
        return {name: list(given[name]) for name in ("train", "val", "test")}
    carved = splitter(given["train"], 0.0 if "val" in given else val_fraction,
                      0.0 if "test" in given else test_fraction, seed)
    return {
        "train": carved["train"],
        "val": list(given["val"]) if "val" in given else carved["val"],
        "test": list(given["test"]) if "test" in given else carved["test"],
    }


def task_splitter(kind: str) -> Splitter:
    """The train/val/test splitter of a multi-label or regression task."""
    return multilabel_split if kind == "multilabel" else regression_split


def _strata(samples: list[Sample], kind: str) -> np.ndarray:
    """One stratum per sample for k-fold splitting: multi-label 0/1 rows, or regression value bins."""
    targets = np.asarray([s.target for s in samples], dtype=np.float64)
    if kind == "multilabel":
        return targets.astype(np.int64)
    bins = max(1, min(_MAX_BINS, len(samples) // 4))
    edges = np.unique(np.quantile(targets[:, 0], np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, targets[:, 0], side="right")


def vector_folds(samples: list[Sample], groups: dict[Path, str] | None, n_folds: int, seed: int,
                 kind: str) -> list[np.ndarray]:
    """Index arrays of `n_folds` disjoint parts of `samples` for cross-validation of a multi-label
    (iteratively stratified) or regression (binned by value) task; whole groups when given."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    from sklearn.model_selection import StratifiedKFold

    members: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        members.setdefault(groups[sample.path] if groups else str(i), []).append(i)
    units = sorted(members)
    if len(units) < n_folds:
        what = "groups" if groups else "images"
        raise VisionFTError(f"{len(units)} {what} cannot make {n_folds} folds; need at least {n_folds} {what}")
    proxies = [Sample(Path(u), 0, _pooled_target([samples[i] for i in members[u]])) for u in units]
    strata = _strata(proxies, kind)
    if kind == "multilabel":
        splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        if np.bincount(strata).min() < n_folds:  # too few values per bin: plain shuffled folds
            strata = np.zeros(len(units), dtype=np.int64)
    held = [test for _, test in splitter.split(np.zeros(len(units)), strata)]
    return [np.sort(np.concatenate([members[units[u]] for u in part])) for part in held]
