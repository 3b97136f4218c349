"""Write the ELPV solar-cell images (from the `elpv-dataset` package) as ImageFolder trees.

- `<out>/binary/{functional,defective}`: defect probability >= 0.5 counts as defective, the
  binary task of Deitsch et al. 2019 (reference CNN: 88.4 % accuracy).
- `<out>/4class/{p000,p033,p067,p100}`: the four annotated defect probabilities.

Image names carry the module type (mono/poly) and the dataset index, so a row can be traced
back to the original. Existing trees are reused, not rewritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FOUR_CLASS_NAMES = {0: "p000", 1: "p033", 2: "p067", 3: "p100"}


def _link_or_copy(source: Path, target: Path) -> None:
    """Both trees hold the same files: a hard link halves the PNG encoding and the disk use."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)


def write_elpv_folders(out: Path) -> tuple[Path, Path]:
    """Write both ImageFolder trees under `out` (skipped when already complete); return their roots."""
    from elpv_dataset.utils import load_dataset

    binary, four = out / "binary", out / "4class"
    done_marker = out / ".complete"
    if done_marker.is_file():
        return binary, four
    images, probs, types = load_dataset()
    levels = np.rint(np.asarray(probs) * 3).astype(int)  # 0, 1/3, 2/3, 1 -> 0..3
    for index, (image, prob, level, module) in enumerate(zip(images, probs, levels, types)):
        name = f"{module}_{index:04d}.png"
        label = "defective" if prob >= 0.5 else "functional"
        first, second = binary / label / name, four / FOUR_CLASS_NAMES[int(level)] / name
        for folder in (first.parent, second.parent):
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(first)
        _link_or_copy(first, second)
    done_marker.write_text(f"{len(images)} images\n")
    return binary, four


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the ImageFolder trees into")
    args = parser.parse_args()
    binary, four = write_elpv_folders(args.out)
    for root in (binary, four):
        counts = {d.name: sum(1 for _ in d.iterdir()) for d in sorted(root.iterdir())}
        print(f"{root}: {counts}")


if __name__ == "__main__":
    main()
