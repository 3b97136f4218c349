"""`--heatmaps OUT`: one PNG per image, the heatmap drawn over it, named after the image."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vision_ft.errors import VisionFTError
from vision_ft.heatmaps.overlay import write_overlay


def heatmap_paths(images: Sequence[Path], source: Path, out: Path) -> list[Path]:
    """out/<image path relative to the source folder>.png; refuses to replace existing files."""
    source = Path(source)
    base = source if source.is_dir() else source.parent
    targets = []
    for image in images:
        try:
            relative = Path(image).resolve().relative_to(base.resolve())
        except ValueError:
            relative = Path(Path(image).name)
        targets.append(out / relative.with_suffix(relative.suffix + ".png"))
    taken = [t for t in targets if t.exists()]
    if taken:
        raise VisionFTError(f"--heatmaps {out} already holds {taken[0]}; choose an empty folder so no earlier heatmap is replaced")
    if out.exists() and not out.is_dir():
        raise VisionFTError(f"--heatmaps {out} is a file; pass a folder to write the heatmap PNGs into")
    return targets


def write_heatmaps(images: Sequence[Path], maps: Sequence[np.ndarray], source: Path, out: Path) -> int:
    """Write each image with its map (0..1) overlaid; returns the number written."""
    targets = heatmap_paths(images, source, out)
    for image, heat, target in zip(images, maps, targets):
        write_overlay(image, heat, target)
    return len(targets)


