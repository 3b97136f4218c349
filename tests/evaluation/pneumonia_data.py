"""Small copies of the real PneumoniaMNIST chest X-rays, named as if by patient, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.real_data import SHARED_DATA

PNEUMONIA = SHARED_DATA / "pneumoniamnist.npz"
FAST = ["--model", "test_resnet", "--weights", "none", "--set", "data.image_size=32", "--set", "data.workers=0",
        "--set", "train.epochs=1", "--set", "train.warmup_epochs=0", "--set", "train.batch_size=16"]


def write_patients(root: Path, per_class: int, images_per_patient: int = 3) -> Path:
    """`root/<normal|pneumonia>/P<patient>_<k>.png`: real images, grouped into made-up patients."""
    if not PNEUMONIA.is_file():
        pytest.skip(f"needs {PNEUMONIA}")
    data = np.load(PNEUMONIA)
    images, labels = data["train_images"], data["train_labels"].ravel()
    for label, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            patient = f"P{label}{k // images_per_patient:03d}"
            Image.fromarray(images[index]).save(root / name / f"{patient}_{k % images_per_patient}.png")
    return root
