"""Where the tests find real images: the NEU-DET steel-defect folder beside the repository
(see ../shared/data/README.md), and small class-stratified copies of it for fast runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Real datasets live next to the repository, never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NEU = SHARED_DATA / "neu-det"

needs_neu = pytest.mark.skipif(not NEU.is_dir(), reason="needs the NEU-DET images in ../shared/data")

# The run every end-to-end test shares: 3 NEU-DET classes x 16 images, resnet18 from scratch at
# 64 px, 2 epochs, ONNX model written at the end of training (about 40 s on 2 CPU cores).
RUN_CLASSES = ("crazing", "inclusion", "scratches")
RUN_PER_CLASS = 16
RUN_ARGS = ["--set", "train.epochs=2", "--set", "data.image_size=64", "--set", "data.workers=0",
            "--set", "train.batch_size=16", "--set", "train.warmup_epochs=0", "--weights", "none",
            "--model", "resnet18"]


def copy_neu_subset(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """The first `per_class` images of each NEU-DET class copied into `root/<class>/`."""
    if not NEU.is_dir():
        pytest.skip("needs the NEU-DET images in ../shared/data")
    for name in classes:
        (root / name).mkdir(parents=True)
        for image in sorted((NEU / name).glob("*.jpg"))[:per_class]:
            shutil.copy(image, root / name / image.name)
    return root
