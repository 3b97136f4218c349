"""Stratified splitting, pre-split handling, and the split file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vision_ft.data.discover import DatasetIndex, Sample, discover
from vision_ft.data.split import load_split, make_splits, save_split, split_fingerprint, stratified_split
from vision_ft.errors import VisionFTError


def fake_samples(root: Path, counts: list[int]) -> list[Sample]:
    """Samples with made-up paths (the splitter never opens files)."""
    return [Sample(root / f"c{label}" / f"{i:04d}.png", label) for label, n in enumerate(counts) for i in range(n)]


def per_class(samples: list[Sample], num_classes: int) -> list[int]:
    return [sum(s.label == k for s in samples) for k in range(num_classes)]


def test_stratified_proportions_and_disjoint_cover(tmp_path):
    samples = fake_samples(tmp_path, [100, 40, 20])
    splits = stratified_split(samples, 0.2, 0.1, seed=0)
    assert per_class(splits["val"], 3) == [20, 8, 4]
    assert per_class(splits["test"], 3) == [10, 4, 2]
    assert per_class(splits["train"], 3) == [70, 28, 14]
    paths = [s.path for part in splits.values() for s in part]
    assert len(paths) == len(set(paths)) == len(samples)


def test_deterministic_for_seed_and_input_order(tmp_path):
    samples = fake_samples(tmp_path, [30, 30])
    first = stratified_split(samples, 0.2, 0.2, seed=7)
    again = stratified_split(list(reversed(samples)), 0.2, 0.2, seed=7)
    other = stratified_split(samples, 0.2, 0.2, seed=8)
    assert first == again
    assert first["val"] != other["val"]


def test_tiny_classes_still_reach_every_split(tmp_path):
    splits = stratified_split(fake_samples(tmp_path, [3, 4, 50]), 0.1, 0.1, seed=0)
    for name in ("train", "val", "test"):
        assert all(n >= 1 for n in per_class(splits[name], 3)), name


def test_class_too_small_to_split_names_class_and_count(tmp_path):
    samples = fake_samples(tmp_path, [10, 2])
    with pytest.raises(VisionFTError, match=r"class 'rare' has 2 images.*at least 3"):
        stratified_split(samples, 0.2, 0.2, seed=0, class_names=["common", "rare"])
    # Without a test split two images are enough.
    splits = stratified_split(samples, 0.2, 0.0, seed=0)
    assert splits["test"] == [] and per_class(splits["val"], 2) == [2, 1]


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions(tmp_path, val, test):
    with pytest.raises(VisionFTError, match="fraction"):
        stratified_split(fake_samples(tmp_path, [10, 10]), val, test, seed=0)


def test_make_splits_keeps_given_splits_and_carves_missing_one(tmp_path):
    train = fake_samples(tmp_path / "train", [20, 20])
    val = fake_samples(tmp_path / "val", [3, 3])
    index = DatasetIndex(tmp_path, ["a", "b"], train + val, presplit={"train": train, "val": val}, skipped=[])
    splits = make_splits(index, 0.5, 0.25, seed=0)
    assert splits["val"] == val  # as given, the 0.5 does not apply
    assert per_class(splits["test"], 2) == [5, 5]  # carved from train
    assert len(splits["train"]) == 30
    assert not {s.path for s in splits["test"]} & {s.path for s in splits["train"]}


def test_save_load_round_trip_and_fingerprint(tmp_path):
    root = tmp_path / "data"
    index = DatasetIndex(root, ["a", "b"], fake_samples(root, [5, 5]), presplit=None, skipped=[])
    splits = make_splits(index, 0.2, 0.2, seed=3)
    split_file = tmp_path / "run" / "split.json"
    save_split(split_file, splits, index, seed=3)

    document = json.loads(split_file.read_text())
    assert document["class_names"] == ["a", "b"] and document["seed"] == 3
    assert document["root"] == str(root)
    assert document["splits"]["train"][0][0].startswith("c")  # relative to the root
    assert document["fingerprint"] == split_fingerprint(splits)

    class_names, loaded = load_split(split_file)
    assert class_names == ["a", "b"]
    assert loaded == splits


def test_fingerprint_ignores_location_and_order_but_not_content(tmp_path):
    here = stratified_split(fake_samples(tmp_path / "one", [10, 10]), 0.2, 0.0, seed=0)
    moved = stratified_split(fake_samples(tmp_path / "elsewhere" / "two", [10, 10]), 0.2, 0.0, seed=0)
    assert split_fingerprint(here) == split_fingerprint(moved)
    assert split_fingerprint({"train": list(reversed(here["train"]))}) == split_fingerprint(here)
    assert split_fingerprint(here) != split_fingerprint({"train": here["train"][1:]})
    assert len(split_fingerprint(here)) == 16


def test_load_split_mistakes(tmp_path):
    with pytest.raises(VisionFTError, match="does not exist"):
        load_split(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(VisionFTError, match="not valid JSON"):
        load_split(broken)
    broken.write_text(json.dumps({"root": "/x", "class_names": ["a"], "splits": {"train": [["p.png", 4]]}}))
    with pytest.raises(VisionFTError, match="malformed"):
        load_split(broken)


def test_real_neu_det_split(neu_det):
    index = discover(neu_det)
    splits = make_splits(index, 0.15, 0.15, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1260, 270, 270]
    assert per_class(splits["val"], 6) == [45] * 6
    assert split_fingerprint(splits) == split_fingerprint(make_splits(index, 0.15, 0.15, seed=0))
