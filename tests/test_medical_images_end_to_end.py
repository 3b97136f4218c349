"""DICOM and 16-bit images end to end: train, eval, predict, export, and the torch-free runtime
giving the same scores as torch under the recorded intensity policy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.real_data import copy_neu_subset
from vision_ft.cli import main
from vision_ft.onnx_metadata import read_metadata

pytestmark = pytest.mark.slow

FAST = ["--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.batch_size=8", "--set",
        "train.warmup_epochs=0", "--set", "train.epochs=1", "--weights", "none", "--model", "resnet18"]


def _predicted_scores(csv_path: Path) -> dict[str, float]:
    return {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(csv_path.open())}


def _run_and_compare(data: Path, out: Path, tmp_path: Path, images: Path, overrides: list[str]) -> None:
    """Train, eval, predict with torch and with the ONNX runtime; the two agree to 1e-4."""
    assert main(["train", "--data", str(data), "--out", str(out), *FAST, *overrides]) == 0
    assert (out / "model.onnx").is_file()
    assert main(["eval", str(out), "--data", str(data), "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["num_samples"] > 0
    assert main(["predict", str(out), str(images), "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(out / "model.onnx"), str(images), "--out", str(tmp_path / "onnx.csv")]) == 0
    by_torch, by_runtime = _predicted_scores(tmp_path / "torch.csv"), _predicted_scores(tmp_path / "onnx.csv")
    assert by_torch.keys() == by_runtime.keys() and len(by_torch) >= 4
    assert max(abs(by_torch[k] - by_runtime[k]) for k in by_torch) < 1e-4


def test_dicom_folders_train_and_the_runtime_matches_torch(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    samples = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
    if not samples.is_dir():
        pytest.skip("pydicom's dicomdirtests samples are not installed")
    data = tmp_path / "dicom"
    for modality in ("CT", "MR"):
        (data / modality.lower()).mkdir(parents=True)
        for source in sorted(samples.glob(f"*/{modality}*/*")):  # real CT and MR slices, no file extension
            shutil.copy(source, data / modality.lower() / f"{source.parent.name}_{source.name}")
    out = tmp_path / "run"
    _run_and_compare(data, out, tmp_path, data / "mr", ["--set", "data.val_fraction=0.2", "--set", "data.test_fraction=0.2"])
    import onnx

    metadata = read_metadata(onnx.load(str(out / "model.onnx")), "model.onnx")
    assert metadata.dicom_window == "file" and metadata.intensity == "auto"


def test_sixteen_bit_pngs_use_the_recorded_policy_in_the_runtime(tmp_path):
    neu = copy_neu_subset(tmp_path / "neu", ("crazing", "scratches"), 10)
    rng = np.random.default_rng(0)
    data = tmp_path / "wide"
    for source in sorted(neu.rglob("*.jpg")):
        eight = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
        # A detector-like 16-bit image: a narrow band of a wide range, with a few hot pixels.
        wide = (20000 + eight * 30 + rng.normal(0, 5, eight.shape)).clip(0, 65535).astype(np.uint16)
        wide.flat[rng.integers(0, wide.size, 3)] = 65535
        target = data / source.parent.name / (source.stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(wide).save(target)
    assert Image.open(target).mode.startswith("I")
    out = tmp_path / "run"
    _run_and_compare(data, out, tmp_path, data / "crazing", ["--set", "data.intensity=percentile[1,99]"])
    import onnx

    assert read_metadata(onnx.load(str(out / "model.onnx")), "model.onnx").intensity == "percentile[1,99]"
