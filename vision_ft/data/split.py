"""Train/val/test splits: stratified, deterministic for a seed, saved beside each run.

Each class is split on its own (stratification), so every split keeps the class proportions of
the data. Per class, ``round(n * fraction)`` images go to val and to test, at least one each
when that fraction is above zero, and at least one always stays in train. A class with fewer
images than the number of non-empty splits cannot be split and raises ``VisionFTError``.

The split file is JSON, with paths relative to the data root, so a run records exactly which
images it trained on::

    {"format": 1, "root": "/data/steel", "seed": 0, "class_names": [...],
     "fingerprint": "3f2a...", "splits": {"train": [["crazing/1.jpg", 0], ...], "val": [...], "test": [...]}}

With `data.group_by`, splits are also grouped (no patient in two splits, see
`vision_ft.data.groups`), and the file adds ``"groups": {"crazing/1.jpg": "P12", ...}`` and the
achieved ``"class_proportions"`` of each split.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from vision_ft.data.discover import SPLIT_NAMES, DatasetIndex, Sample
from vision_ft.data.groups import check_group_leak, class_proportions, hold_out
from vision_ft.errors import VisionFTError

SPLIT_FORMAT = 1


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise VisionFTError(f"{name}={value} is out of range; use a value in [0, 1), e.g. 0.15")
    if val_fraction + test_fraction >= 1.0:
        raise VisionFTError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training images; keep the sum below 1"
        )


def _held_out_count(n: int, fraction: float) -> int:
    if fraction <= 0.0:
        return 0
    return max(1, int(n * fraction + 0.5))  # round half up; never 0 for a split that was asked for


def stratified_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int, class_names: list[str] | None = None
) -> dict[str, list[Sample]]:
    """{"train", "val", "test"} lists with each class divided in the given proportions.

    Deterministic for a seed and independent of the order of `samples`. `class_names` only
    makes error messages name the class instead of its index.
    """
    _check_fractions(val_fraction, test_fraction)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    wanted = 1 + (val_fraction > 0) + (test_fraction > 0)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: str(s.path))
        n = len(members)
        name = class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
        if n < wanted:
            raise VisionFTError(
                f"class {name!r} has {n} image{'s' if n != 1 else ''}, too few to split into train/val/test "
                f"(needs at least {wanted}); add images, or set data.val_fraction / data.test_fraction to 0"
            )
        n_val = _held_out_count(n, val_fraction)
        n_test = _held_out_count(n, test_fraction)
        # Keep at least one training image: shrink the larger held-out part first.
        while n_val + n_test > n - 1:
            if n_val >= n_test and n_val > (val_fraction > 0):
                n_val -= 1
            elif n_test > (test_fraction > 0):
                n_test -= 1
            else:
                n_val -= 1
        # Each class gets its own generator, so adding a class leaves the others' split unchanged.
        order = np.random.default_rng([seed, label]).permutation(n)
        shuffled = [members[i] for i in order]
        splits["val"].extend(shuffled[:n_val])
        splits["test"].extend(shuffled[n_val : n_val + n_test])
        splits["train"].extend(shuffled[n_val + n_test :])
    return {name: sorted(part, key=lambda s: (s.label, str(s.path))) for name, part in splits.items()}


def grouped_split(samples: list[Sample], groups: dict[Path, str], val_fraction: float, test_fraction: float,
                  seed: int, class_names: list[str]) -> dict[str, list[Sample]]:
    """Like `stratified_split`, but whole groups go to one split (stratified as well as groups allow)."""
    _check_fractions(val_fraction, test_fraction)
    rest, test = hold_out(samples, groups, test_fraction, seed, "parts for a test split")
    train, val = hold_out(rest, groups, val_fraction / (1.0 - test_fraction), seed + 1, "parts for a validation split")
    lacking = sorted(set(range(len(class_names))) - {s.label for s in train})
    if lacking:
        raise VisionFTError(
            f"grouped split left class {class_names[lacking[0]]!r} without training images (its images belong to "
            "few groups); add data, or lower data.val_fraction / data.test_fraction"
        )
    return {"train": train, "val": val, "test": test}


def make_splits(index: DatasetIndex, val_fraction: float, test_fraction: float, seed: int,
                allow_group_leak: bool = False) -> dict[str, list[Sample]]:
    """The train/val/test split of a dataset: the given one when the data is pre-split.

    A pre-split dataset keeps its splits as given; a missing val or test split is carved out of
    train (its fraction then applies to the train images). With `index.groups`, splits are
    grouped, and given splits whose groups cross are refused unless `allow_group_leak`.
    """
    groups = index.groups

    def split(samples: list[Sample], val: float, test: float) -> dict[str, list[Sample]]:
        if groups:
            return grouped_split(samples, groups, val, test, seed, index.class_names)
        return stratified_split(samples, val, test, seed, index.class_names)

    if index.presplit is None:
        return split(index.samples, val_fraction, test_fraction)
    given = index.presplit
    if groups:
        check_group_leak(given, groups, allow_group_leak)
    carve_val = 0.0 if "val" in given else val_fraction
    carve_test = 0.0 if "test" in given else test_fraction
    carved = split(given["train"], carve_val, carve_test)
    return {
        "train": carved["train"],
        "val": list(given["val"]) if "val" in given else carved["val"],
        "test": list(given["test"]) if "test" in given else carved["test"],
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a CSV may point outside its folder
        return Path(os.path.relpath(path, root)).as_posix()


def split_fingerprint(splits: dict[str, list[Sample]]) -> str:
    """Short sha256 of the sorted training list (paths and labels).

    Paths are taken relative to their common folder, so the same split of a dataset that was
    moved or copied to another machine has the same fingerprint.
    """
    train = splits.get("train", [])
    if not train:
        return hashlib.sha256(b"").hexdigest()[:16]
    paths = [str(s.path) for s in train]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
    lines = sorted(f"{_relative(s.path, common)}\t{s.label}" for s in train)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def save_split(path: Path, splits: dict[str, list[Sample]], index: DatasetIndex, seed: int) -> None:
    """Write the split as JSON (paths relative to the data root); see the module docstring."""
    root = Path(index.root)
    document = {
        "format": SPLIT_FORMAT,
        "root": str(root),
        "seed": seed,
        "class_names": list(index.class_names),
        "fingerprint": split_fingerprint(splits),
        "splits": {
            name: [[_relative(s.path, root), s.label] for s in splits.get(name, [])] for name in SPLIT_NAMES
        },
    }
    if index.groups:
        document["groups"] = {_relative(s.path, root): index.groups[s.path] for part in splits.values() for s in part}
        document["class_proportions"] = class_proportions(splits, list(index.class_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)  # never leave a half-written split behind


def load_split_groups(path: Path) -> dict[Path, str] | None:
    """{image path: group} recorded by save_split, or None for an ungrouped split."""
    document = json.loads(Path(path).read_text())
    if "groups" not in document:
        return None
    root = Path(document["root"])
    return {Path(os.path.normpath(root / rel)): str(group) for rel, group in document["groups"].items()}


def load_split(path: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Class names and the {"train", "val", "test"} samples of a split file written by save_split."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise VisionFTError(f"split file {path} does not exist; is this a run folder made by vision-ft?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VisionFTError(f"split file {path} is not valid JSON ({exc}); restore it or start the run again") from None
    try:
        root = Path(document["root"])
        class_names = [str(name) for name in document["class_names"]]
        splits: dict[str, list[Sample]] = {}
        for name in SPLIT_NAMES:
            entries = document["splits"].get(name, [])
            samples = []
            for rel, label in entries:
                label = int(label)
                if not 0 <= label < len(class_names):
                    raise ValueError(f"label {label} of {rel} is outside 0..{len(class_names) - 1}")
                samples.append(Sample(Path(os.path.normpath(root / rel)), label))
            splits[name] = samples
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VisionFTError(f"split file {path} is malformed ({exc}); restore it or start the run again") from None
    return class_names, splits
