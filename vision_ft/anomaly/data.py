"""Which images an anomaly model is fitted on, validated on and tested on.

Only the good class is ever fitted. Accepted sources:

- a folder of images with no sub-folders: every image is a good part;
- an ImageFolder `root/<class>/`: `good` (anomaly.good_class) is split into train/val/test,
  every other class is a defect class, divided between val and test only;
- a pre-split folder or a CSV with a split column: used as given, but the train split must
  hold good parts only (a defect class there is a mistake worth stopping for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_ft.config import Config
from vision_ft.data.discover import DatasetIndex, Sample, discover, is_image_file
from vision_ft.data.split import stratified_split
from vision_ft.errors import VisionFTError


@dataclass(frozen=True)
class AnomalyData:
    index: DatasetIndex
    good_label: int
    splits: dict[str, list[Sample]]


def good_only_folder(root: Path, good_class: str) -> DatasetIndex | None:
    """A folder holding images and no sub-folders: all good parts."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_dir() for p in entries):
        return None
    images = sorted(p for p in entries if p.is_file() and is_image_file(p))
    if not images:
        return None  # discover() explains what an empty folder lacks
    return DatasetIndex(root=root, class_names=[good_class], samples=[Sample(p, 0) for p in images])


def _split_defects(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """Each defect class divided between val and test in the ratio val_fraction : test_fraction."""
    parts: dict[str, list[Sample]] = {"val": [], "test": []}
    held = val_fraction + test_fraction
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    for label, members in sorted(by_class.items()):
        members = sorted(members, key=lambda s: str(s.path))
        order = np.random.default_rng([seed, label, 1]).permutation(len(members))
        n_val = len(members) if held == 0 else int(round(len(members) * val_fraction / held))
        parts["val"] += [members[i] for i in order[:n_val]]
        parts["test"] += [members[i] for i in order[n_val:]]
    return parts


def anomaly_splits(config: Config) -> AnomalyData:
    """Discover the data and split it for fitting on good parts (see the module docstring)."""
    if not config.data.path:
        raise VisionFTError("no data given; pass --data DIR (a folder of good images, or class folders with 'good')")
    source = Path(config.data.path).expanduser()
    good_class = config.anomaly.good_class
    index = good_only_folder(source.resolve(), good_class) if source.is_dir() else None
    if index is None:
        index = discover(source, every_class_trains=False)
    if good_class not in index.class_names:
        raise VisionFTError(
            f"no good images: {source} has the classes {', '.join(index.class_names)} but none named '{good_class}'; "
            f"put the good parts in a '{good_class}' folder, or name their class with --set anomaly.good_class=NAME"
        )
    good = index.class_names.index(good_class)
    data = config.data
    if index.presplit is not None:
        splits = _presplit(index, good, source, data.val_fraction, data.test_fraction, data.split_seed)
    else:
        goods = [s for s in index.samples if s.label == good]
        splits = stratified_split(goods, data.val_fraction, data.test_fraction, data.split_seed, index.class_names)
        defects = _split_defects([s for s in index.samples if s.label != good], data.val_fraction,
                                 data.test_fraction, data.split_seed)
        for name in ("val", "test"):
            splits[name] = sorted(splits[name] + defects[name], key=lambda s: (s.label, str(s.path)))
    if not splits["train"]:
        raise VisionFTError(f"no good images to fit in the train split of {source}; add images of class '{good_class}'")
    return AnomalyData(index, good, splits)


def _presplit(index: DatasetIndex, good: int, source: Path, val_fraction: float, test_fraction: float,
              seed: int) -> dict[str, list[Sample]]:
    given = index.presplit or {}
    defects_in_train = sorted({index.class_names[s.label] for s in given.get("train", []) if s.label != good})
    if defects_in_train:
        count = sum(1 for s in given["train"] if s.label != good)
        raise VisionFTError(
            f"defect class '{defects_in_train[0]}' is in the train split of {source} ({count} defect images in train); "
            f"an anomaly model is fitted on '{index.class_names[good]}' parts only: move defects to val/test, "
            "or name the good class with --set anomaly.good_class=NAME"
        )
    carved = stratified_split(given.get("train", []), 0.0 if "val" in given else val_fraction,
                              0.0 if "test" in given else test_fraction, seed, index.class_names)
    return {
        "train": carved["train"],
        "val": list(given["val"]) if "val" in given else carved["val"],
        "test": list(given["test"]) if "test" in given else carved["test"],
    }
