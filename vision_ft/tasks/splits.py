"""Train/val/test splits for vector targets, stratified as well as the data allows.

Multi-label: iterative stratification (Sechidis et al. 2011, the `iterative-stratification`
package), which keeps every label's frequency close in each split, rare labels included.
Regression: samples are binned by quantiles of the first target and each bin is split on its
own, so every split covers the range of values. Deterministic for a seed; a pre-split manifest
keeps its splits and only the missing ones are carved out of train.
"""

from __future__ import annotations

from dataclasses import replace
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


def split_index(index: DatasetIndex, splitter: Splitter, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[Sample]]:
    """The splits of `index`: the manifest's own when it has a split column, missing ones carved from train."""
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
