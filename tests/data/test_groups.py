"""Grouped splits: no group in two splits or folds, leaks refused, groups read from CSV or paths."""

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vision_ft.data.discover import DatasetIndex, Sample, discover
from vision_ft.data.groups import assign_groups, check_group_leak, class_proportions, stratified_folds
from vision_ft.data.split import grouped_split, load_split_groups, make_splits, save_split
from vision_ft.errors import VisionFTError


def _grouped_samples(group_sizes: list[int], positive_rate: float, seed: int) -> tuple[list[Sample], dict[Path, str]]:
    """Patients of the given sizes; each patient's images share one label, as in most studies."""
    rng = np.random.default_rng(seed)
    samples, groups = [], {}
    for patient, size in enumerate(group_sizes):
        label = int(rng.random() < positive_rate)
        for image in range(size):
            path = Path(f"/data/{'ab'[label]}/P{patient:03d}_{image}.png")
            samples.append(Sample(path, label))
            groups[path] = f"P{patient:03d}"
    return samples, groups


def _groups_of(samples: list[Sample], groups: dict[Path, str]) -> set[str]:
    return {groups[s.path] for s in samples}


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=30, max_size=80), seed=st.integers(0, 1000))
def test_groups_never_cross_splits_or_folds(sizes, seed):
    samples, groups = _grouped_samples(sizes, 0.4, seed)
    if len({s.label for s in samples}) < 2:
        return
    try:
        splits = grouped_split(samples, groups, 0.15, 0.15, seed, ["a", "b"])
    except VisionFTError:
        return  # a class left without training images is refused, never split silently
    parts = [_groups_of(part, groups) for part in splits.values()]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sorted(s.path for part in splits.values() for s in part) == sorted(s.path for s in samples)

    folds = stratified_folds(samples, groups, 5, seed)
    every = np.sort(np.concatenate(folds))
    assert every.tolist() == list(range(len(samples)))  # the folds partition the data
    fold_groups = [_groups_of([samples[i] for i in fold], groups) for fold in folds]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not (fold_groups[i] & fold_groups[j])


def test_stratification_stays_close_with_unequal_groups():
    rng = np.random.default_rng(0)
    sizes = rng.choice([1, 1, 2, 3, 5, 20], size=200).tolist()  # a few patients with many images
    samples, groups = _grouped_samples(sizes, 0.3, seed=1)
    splits = grouped_split(samples, groups, 0.15, 0.15, 0, ["a", "b"])
    overall = np.mean([s.label for s in samples])
    proportions = class_proportions(splits, ["a", "b"])
    for name in ("train", "val", "test"):
        assert abs(proportions[name]["b"] - overall) < 0.08, (name, proportions[name], overall)
        assert 0.08 < len(splits[name]) / len(samples) if name != "train" else True


def _image(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_groups_from_regex_over_paths_and_from_csv_column(tmp_path):
    for label in ("normal", "pneumonia"):
        for patient in range(3):
            _image(tmp_path / "images" / label / f"P{patient}{label[0]}_scan1.png")
    index = discover(tmp_path / "images")
    groups = assign_groups(index, r"(?P<group>P\d+\w)_", tmp_path / "images")
    assert set(groups.values()) == {"P0n", "P1n", "P2n", "P0p", "P1p", "P2p"}

    manifest = tmp_path / "images" / "list.csv"
    manifest.write_text("path,label,Patient_ID\n" + "".join(
        f"{label}/P{p}{label[0]}_scan1.png,{label},patient-{p}\n" for label in ("normal", "pneumonia") for p in range(3)))
    csv_index = discover(manifest)
    by_column = assign_groups(csv_index, "patient_id", manifest)
    assert by_column[tmp_path / "images" / "pneumonia" / "P2p_scan1.png"] == "patient-2"

    with pytest.raises(VisionFTError, match="named group"):
        assign_groups(index, r"P\d+", tmp_path / "images")
    with pytest.raises(VisionFTError, match="not a valid regular expression"):
        assign_groups(index, r"(?P<group>P\d+", tmp_path / "images")
    with pytest.raises(VisionFTError, match="does not match normal/P0n_scan1.png"):
        assign_groups(index, r"(?P<group>Q\d+)", tmp_path / "images")
    with pytest.raises(VisionFTError, match="neither a column of list.csv"):
        assign_groups(csv_index, "patient", manifest)


def test_presplit_leak_is_refused_or_warned(tmp_path, caplog):
    for split, patients in (("train", ("P1", "P2", "P3")), ("test", ("P3", "P4"))):
        for label in ("a", "b"):
            for patient in patients:
                _image(tmp_path / split / label / f"{patient}_{label}.png")
    index = discover(tmp_path)
    index.groups = assign_groups(index, r"(?P<group>P\d)_", tmp_path)
    with pytest.raises(VisionFTError, match="group 'P3' has images in both train and test"):
        make_splits(index, 0.2, 0.0, 0)
    logger = logging.getLogger("vision_ft")  # training turns propagation off: listen on it directly
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vision_ft"):
            make_splits(index, 0.0, 0.0, 0, allow_group_leak=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert "P3" in caplog.text
    assert check_group_leak({"train": index.presplit["train"]}, index.groups, allow=False) == []


def test_split_file_records_each_images_group(tmp_path):
    samples, groups = _grouped_samples([3] * 20, 0.5, seed=2)
    index = DatasetIndex(root=Path("/data"), class_names=["a", "b"], samples=samples, groups=groups)
    splits = make_splits(index, 0.2, 0.2, seed=0)
    save_split(tmp_path / "split.json", splits, index, seed=0)
    assert load_split_groups(tmp_path / "split.json") == groups
