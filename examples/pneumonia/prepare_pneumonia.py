"""Write PneumoniaMNIST (a MedMNIST v2 ``.npz``) as PNG files and a CSV manifest vision-ft reads.

`<out>/images/<split>_<index>.png` (28 x 28 grey) and `<out>/all.csv` with
``path,label`` rows for every image of the file (train, val and test pooled, since the study
cross-validates over all of them; `split_source` keeps the original split for reference).
Existing output is reused.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("normal", "pneumonia")  # MedMNIST's label 0 and 1


def write_pneumonia(npz: Path, out: Path, limit_per_split: int | None = None) -> Path:
    """Write the PNGs and `all.csv` (skipped when already complete); return the CSV path."""
    manifest = out / "all.csv"
    if manifest.is_file() and limit_per_split is None:
        return manifest
    data = np.load(npz)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].ravel()
        keep = range(len(images)) if limit_per_split is None else _balanced_first(labels, limit_per_split)
        for index in keep:
            name = f"images/{split}_{index:05d}.png"
            Image.fromarray(images[index]).save(out / name)
            rows.append([name, CLASS_NAMES[int(labels[index])], split])
    partial = manifest.with_suffix(".partial")
    with partial.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split_source"])
        writer.writerows(rows)
    partial.replace(manifest)
    return manifest


def _balanced_first(labels: np.ndarray, count: int) -> list[int]:
    """The first `count` indices of each class, for small test copies."""
    return sorted(i for k in np.unique(labels) for i in np.flatnonzero(labels == k)[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=Path("../shared/data/pneumoniamnist.npz"))
    parser.add_argument("--out", type=Path, default=Path(".examples/pneumonia"))
    args = parser.parse_args()
    print(write_pneumonia(args.npz, args.out))


if __name__ == "__main__":
    main()
