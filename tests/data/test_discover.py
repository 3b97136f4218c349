"""Discovery of ImageFolder, pre-split and CSV layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vision_ft.data.discover import IMAGE_SUFFIXES, discover
from vision_ft.errors import VisionFTError


def write_image(path: Path, value: int = 128, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path, format=fmt)
    return path


def make_image_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i}.png", value=10 * i)
    return root


def relative_paths(samples, root: Path) -> list[str]:
    return sorted(s.path.relative_to(root).as_posix() for s in samples)


def test_image_folder_classes_labels_and_nested_images(tmp_path):
    root = make_image_folder(tmp_path / "data", {"ok": 2, "defect": 3})
    write_image(root / "defect" / "batch7" / "deep" / "x.JPG", fmt="JPEG")  # nested, upper-case suffix
    index = discover(root)
    assert index.class_names == ["defect", "ok"]
    assert index.presplit is None
    assert len(index.samples) == 6
    assert all(s.path.is_absolute() for s in index.samples)
    assert [s.label for s in index.samples].count(0) == 4
    assert "defect/batch7/deep/x.JPG" in relative_paths(index.samples, root.resolve())


def test_every_listed_extension_is_found_in_any_case(tmp_path):
    root = tmp_path / "data"
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
    assert set(formats) | {".dcm", ".dicom"} == set(IMAGE_SUFFIXES)  # DICOM: tests/data/test_dicom.py
    for i, (suffix, fmt) in enumerate(formats.items()):
        write_image(root / "a" / f"{i}{suffix.upper() if i % 2 else suffix}", fmt=fmt)
        write_image(root / "b" / f"{i}{suffix}", fmt=fmt)
    index = discover(root)
    assert len(index.samples) == 2 * len(formats)
    assert index.skipped == []


def test_junk_is_silent_and_other_files_are_skipped_with_reason(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 1, "b": 1})
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "Thumbs.db").write_bytes(b"junk")
    (root / "a" / ".hidden.png").write_bytes(b"junk")
    write_image(root / "b" / ".ipynb_checkpoints" / "copy.png")  # hidden folder
    (root / "b" / "notes.txt").write_text("hello")
    (root / "README.md").write_text("about the data")
    index = discover(root)
    assert len(index.samples) == 2
    skipped = {path.name: reason for path, reason in index.skipped}
    assert set(skipped) == {"notes.txt", "README.md"}
    assert "not an image" in skipped["notes.txt"]


def test_presplit_layout_keeps_given_splits_and_unions_classes(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", {"a": 3, "b": 3, "c": 2})
    make_image_folder(root / "val", {"a": 1, "b": 1})  # c absent from val: allowed
    index = discover(root)
    assert index.class_names == ["a", "b", "c"]
    assert set(index.presplit) == {"train", "val"}  # test is made later by the splitter
    assert len(index.presplit["train"]) == 8
    assert len(index.presplit["val"]) == 2
    assert len(index.samples) == 10
    assert {s.label for s in index.presplit["val"]} == {0, 1}
    assert all("val" in s.path.parts for s in index.presplit["val"])


def test_presplit_class_missing_from_train_is_an_error(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", {"a": 2, "b": 2})
    make_image_folder(root / "test", {"a": 1, "rare": 1})
    with pytest.raises(VisionFTError, match="'rare'.*train"):
        discover(root)


def test_presplit_without_train_folder_is_an_error(tmp_path):
    make_image_folder(tmp_path / "data" / "val", {"a": 1, "b": 1})
    with pytest.raises(VisionFTError, match="no train folder"):
        discover(tmp_path / "data")


def test_split_folders_mixed_with_class_folders_is_an_error(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", {"a": 1, "b": 1})
    make_image_folder(root, {"cat": 1})
    with pytest.raises(VisionFTError, match="mixes split folders"):
        discover(root)


def test_csv_manifest_with_split_column(tmp_path):
    root = tmp_path / "data"
    for name in ("x1", "x2", "x3", "y1", "y2", "y3"):
        write_image(root / "imgs" / f"{name}.png")
    (root / "imgs" / "info.txt").write_text("not an image")
    manifest = root / "labels.csv"
    manifest.write_text(
        "path,label,split\n"
        "imgs/x1.png,good,train\nimgs/x2.png,good,val\nimgs/x3.png,good,test\n"
        "imgs/y1.png,bad,train\nimgs/y2.png,bad,TRAIN\nimgs/y3.png,bad,test\n"
        "imgs/info.txt,bad,train\n"
    )
    index = discover(manifest)
    assert index.class_names == ["bad", "good"]
    assert index.root == root.resolve()
    assert {k: len(v) for k, v in index.presplit.items()} == {"train": 3, "val": 1, "test": 2}
    assert [p.name for p, _ in index.skipped] == ["info.txt"]
    by_name = {s.path.name: s.label for s in index.samples}
    assert by_name["x1.png"] == 1 and by_name["y1.png"] == 0


def test_csv_manifest_without_split_column_and_numeric_labels(tmp_path):
    for i in range(12):
        write_image(tmp_path / f"{i}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{i}.png,{[2, 10, 9][i % 3]}\n" for i in range(12)))
    index = discover(manifest)
    assert index.presplit is None
    assert index.class_names == ["2", "9", "10"]  # numbers sort as numbers
    assert len(index.samples) == 12


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("file,class\na.png,x\n", "lacks the columns path, label"),
        ("path,label\nmissing.png,x\nb.png,y\n", "not found: missing.png"),
        ("path,label,split\na.png,x,train\nb.png,y,holdout\n", "split 'holdout'"),
        ("path,label\na.png,x\na.png,y\n", "already listed on line 2"),
        ("path,label\na.png,x\nb.png,x\n", "only one class"),
        ("path,label\na.png,\n", "empty label"),
    ],
)
def test_csv_manifest_mistakes(tmp_path, body, message):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(body)
    with pytest.raises(VisionFTError, match=message):
        discover(manifest)


def test_no_images_at_all(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.txt").write_text("x")
    with pytest.raises(VisionFTError, match="holds no images"):
        discover(tmp_path / "data")


def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "empty_class").mkdir()
    with pytest.raises(VisionFTError, match="empty_class holds no images"):
        discover(root)


def test_single_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", {"only": 3})
    with pytest.raises(VisionFTError, match="only one class.*'only'"):
        discover(root)


def test_missing_source_and_non_csv_file(tmp_path):
    with pytest.raises(VisionFTError, match="does not exist"):
        discover(tmp_path / "nowhere")
    write_image(tmp_path / "one.png")
    with pytest.raises(VisionFTError, match="not a .csv"):
        discover(tmp_path / "one.png")


def test_real_neu_det_folder(neu_det):
    index = discover(neu_det)
    assert index.class_names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert len(index.samples) == 1800
    assert [sum(s.label == k for s in index.samples) for k in range(6)] == [300] * 6
    assert index.presplit is None
    assert index.skipped == []
