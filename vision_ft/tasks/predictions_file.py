"""predictions.csv of a multi-label or regression run: every val/test image's targets and scores.

Written at the end of training beside metrics.json (classification runs write theirs through
`vision_ft.evaluation.run_evaluation`, with logits); cross-validation pools the test rows of
its folds from it. Columns: split, path, group, ``true_<name>`` and ``score_<name>`` per label
or target.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_ft.errors import VisionFTError


@dataclass(frozen=True)
class ScoredSplit:
    paths: list[str]
    groups: list[str] | None
    targets: np.ndarray  # N x outputs
    scores: np.ndarray  # N x outputs


def write_scored(path: Path, splits: dict[str, ScoredSplit], names: list[str]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "path", "group", *(f"true_{n}" for n in names), *(f"score_{n}" for n in names)])
        for split, part in splits.items():
            for i, image in enumerate(part.paths):
                writer.writerow([split, image, part.groups[i] if part.groups else "",
                                 *(f"{v:.9g}" for v in part.targets[i]), *(f"{v:.9g}" for v in part.scores[i])])
    tmp.replace(path)


def read_scored(path: Path, names: list[str]) -> dict[str, ScoredSplit]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        by_split: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_split.setdefault(row["split"], []).append(row)
        result = {}
        for split, part in by_split.items():
            groups = [r["group"] for r in part]
            result[split] = ScoredSplit(
                [r["path"] for r in part], groups if any(groups) else None,
                np.array([[float(r[f"true_{n}"]) for n in names] for r in part]).reshape(len(part), len(names)),
                np.array([[float(r[f"score_{n}"]) for n in names] for r in part]).reshape(len(part), len(names)))
        return result
    except (OSError, KeyError, ValueError) as exc:
        raise VisionFTError(f"{path} is missing or malformed ({exc}); train the run again") from None
