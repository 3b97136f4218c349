"""Mistakes in anomaly data end in one line naming the problem and the fix, and leave no run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.real_data import NEU, needs_neu
from vision_ft.cli import main

QUICK = ["--task", "anomaly", "--model", "resnet18", "--weights", "none", "--set", "data.image_size=32",
         "--set", "data.workers=0", "--set", "export.onnx=false"]


def _copy(root: Path, name: str, neu_class: str, count: int, start: int = 0) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for image in sorted((NEU / neu_class).glob("*.jpg"))[start:start + count]:
        shutil.copy(image, root / name / image.name)


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["train", *QUICK, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@needs_neu
def test_no_good_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _copy(data, "scratches", "scratches", 4)
    _copy(data, "inclusion", "inclusion", 4)
    line = _one_line_error(["--data", str(data), "--out", str(tmp_path / "run")], capsys)
    assert "no good images" in line and "anomaly.good_class" in line and "scratches" in line
    # The good class named but absent is the same mistake.
    line = _one_line_error(["--data", str(data), "--out", str(tmp_path / "run"), "--set", "anomaly.good_class=ok"], capsys)
    assert "none named 'ok'" in line
    assert not (tmp_path / "run").exists()


@needs_neu
def test_defect_class_in_the_fitted_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "presplit"
    _copy(data / "train", "good", "rolled-in_scale", 6)
    _copy(data / "train", "scratches", "scratches", 3)  # the mistake
    _copy(data / "val", "good", "rolled-in_scale", 2, start=6)
    line = _one_line_error(["--data", str(data), "--out", str(tmp_path / "run")], capsys)
    assert "defect class 'scratches' is in the train split" in line and "3 defect images" in line
    manifest = tmp_path / "parts.csv"
    rows = ["path,label,split"] + [f"{p.relative_to(tmp_path)},{p.parent.name},train" for p in sorted(data.rglob("*.jpg"))]
    manifest.write_text("\n".join(rows) + "\n")
    line = _one_line_error(["--data", str(manifest), "--out", str(tmp_path / "run")], capsys)
    assert "defect class 'scratches'" in line and str(manifest) in line
    assert not (tmp_path / "run").exists()


@needs_neu
def test_backbone_without_feature_maps_and_no_validation_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good"
    _copy(tmp_path, "good", "rolled-in_scale", 6)
    line = _one_line_error(["--data", str(good), "--out", str(tmp_path / "run"), "--model", "vit_tiny_patch16_224"], capsys)
    assert "vit_tiny_patch16_224" in line and "CNN" in line
    line = _one_line_error(["--data", str(good), "--out", str(tmp_path / "run"), "--set", "data.val_fraction=0"], capsys)
    assert "validation split" in line and "val_fraction" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    line = _one_line_error(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")], capsys)
    assert "holds no images" in line
