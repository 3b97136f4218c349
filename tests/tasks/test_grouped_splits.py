"""Multi-label and regression splits with data.group_by: whole patients go to one split, and the
splits stay stratified (every label in train, values spread over the range)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_ft.config import build_config
from vision_ft.data.groups import assign_groups
from vision_ft.errors import VisionFTError
from vision_ft.tasks import build_task


def _manifest(root: Path, header: list[str], rows: list[list[str]]) -> Path:
    path = root / "data.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _images(root: Path, count: int) -> list[str]:
    (root / "img").mkdir()
    names = []
    for i in range(count):
        name = f"img/{i:03d}.png"
        Image.fromarray(np.full((8, 8), i % 255, np.uint8)).save(root / name)
        names.append(name)
    return names


def _splits(kind: str, manifest: Path) -> tuple[dict, dict]:
    config = build_config(None, [f"task={kind}", f"data.path={manifest}", "data.group_by=patient",
                                "data.val_fraction=0.2", "data.test_fraction=0.2"])
    task = build_task(config)
    index = task.discover(manifest)
    index.groups = assign_groups(index, "patient", manifest)
    return task.split(index), index.groups


def test_multilabel_split_keeps_each_patient_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    names = _images(tmp_path, 120)
    labels = ["effusion", "nodule", "mass"]
    # 30 patients with 4 images each; a patient's findings are shared by its images (mostly).
    rows = []
    for i, name in enumerate(names):
        patient = i // 4
        found = [label for j, label in enumerate(labels) if (patient * (j + 3)) % 5 < 2 or rng.random() < 0.05]
        rows.append([name, ";".join(found), f"p{patient:02d}"])
    splits, groups = _splits("multilabel", _manifest(tmp_path, ["path", "labels", "patient"], rows))
    where = {}
    for part, samples in splits.items():
        for sample in samples:
            assert where.setdefault(groups[sample.path], part) == part, "a patient crosses splits"
    assert sum(len(v) for v in splits.values()) == 120 and all(len(splits[p]) >= 16 for p in ("val", "test"))
    for part in ("train", "val", "test"):
        present = np.asarray([s.target for s in splits[part]]).sum(axis=0)
        assert (present > 0).all(), f"{part} lacks a label: {present}"


def test_regression_split_keeps_each_patient_in_one_split(tmp_path):
    names = _images(tmp_path, 80)
    rows = [[name, f"{(i // 4) / 20:.3f}", f"p{i // 4:02d}"] for i, name in enumerate(names)]
    splits, groups = _splits("regression", _manifest(tmp_path, ["path", "target", "patient"], rows))
    patients = {part: {groups[s.path] for s in samples} for part, samples in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    for part in ("val", "test"):  # value-binned: each split spans low and high targets
        values = [s.target[0] for s in splits[part]]
        assert min(values) < 0.35 and max(values) > 0.6


def test_presplit_manifest_with_a_patient_in_two_splits_is_refused(tmp_path):
    names = _images(tmp_path, 12)
    rows = [[name, "a" if i % 2 else "b", "p0" if i < 2 else f"p{i}", "test" if i == 1 else "train"]
            for i, name in enumerate(names)]
    with pytest.raises(VisionFTError, match="group 'p0' has images in both"):
        _splits("multilabel", _manifest(tmp_path, ["path", "labels", "patient", "split"], rows))
