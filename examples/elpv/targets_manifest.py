"""Write one CSV manifest of the ELPV cells for a 4-class classifier and a regressor on the same split.

Columns: ``path`` (into the 4-class tree of `prepare_elpv.py`), ``label`` (p000, p033, p067,
p100), ``target`` (the defect probability 0, 1/3, 2/3, 1) and ``split`` (train/val/test, drawn
once, stratified by defect level), so ``task: classification`` reads ``label`` and
``task: regression`` reads ``target`` from the same rows and the same split.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from vision_ft.data.discover import discover
from vision_ft.data.split import stratified_split

LEVELS = {"p000": 0.0, "p033": 1 / 3, "p067": 2 / 3, "p100": 1.0}


def write_manifest(four_class_root: Path, out: Path, val_fraction: float, test_fraction: float, seed: int) -> Path:
    """The manifest at `out`, rows sorted by path; the split is stratified by defect level."""
    index = discover(four_class_root)
    splits = stratified_split(index.samples, val_fraction, test_fraction, seed, index.class_names)
    rows = []
    for split, samples in splits.items():
        for sample in samples:
            name = index.class_names[sample.label]
            relative = sample.path.relative_to(out.parent.resolve()).as_posix()
            rows.append((relative, name, f"{LEVELS[name]:.6f}", split))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "target", "split"])
        writer.writerows(sorted(rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elpv", type=Path, required=True, help="folder written by prepare_elpv.py (holds 4class/)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_manifest((args.elpv / "4class").resolve(), args.elpv.resolve() / "targets.csv",
                         args.val_fraction, args.test_fraction, args.seed)
    print(out)


if __name__ == "__main__":
    main()
