"""Hostile inputs end in one line or a clearly marked result, never in garbage or a blow-up:
non-finite model outputs, metadata that lies about the graph, YAML alias bombs, huge images,
symlinked datasets, run folders inside the data, unreadable images in predict, TorchScript files.

Each test names the issue item it covers. BAD_INPUTS counts what these tests try."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from tests.test_runtime import CLASSES, make_classifier, make_metadata
from vision_ft.cli import main
from vision_ft.data.decode import decode_problem, load_image
from vision_ft.data.discover import discover
from vision_ft.errors import VisionFTError
from vision_ft.onnx_metadata import PREFIX
from vision_ft.quantize import check_model_belongs_to_run
from vision_ft.run_folder import create_run_folder
from vision_ft.predict import prediction_rows
from vision_ft.runtime import ERROR, UNCERTAIN, load_model, mark_uncertain


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _images(folder: Path, count: int = 3, size: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


# ---------------------------------------------------------------- item 4: non-finite outputs


def _nan_classifier(path: Path) -> Path:
    make_classifier(path, make_metadata())
    proto = onnx.load(str(path))
    for tensor in proto.graph.initializer:
        if tensor.name == "bias":
            tensor.CopyFrom(numpy_helper.from_array(np.array([np.nan, 0.0, 0.0], np.float32), "bias"))
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("threshold", [None, "0.99"])
def test_nan_outputs_never_become_a_label(tmp_path, threshold):
    model_path = _nan_classifier(tmp_path / "nan.onnx")
    images = _images(tmp_path / "images")
    for prediction in load_model(model_path).predict(images, threshold=0.99 if threshold else None):
        assert prediction.label == ERROR and "not finite" in prediction.error
    out = tmp_path / "preds.csv"
    extra = ["--threshold", threshold] if threshold else []
    assert main(["predict", str(model_path), str(tmp_path / "images"), "--out", str(out), *extra]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    assert all(r["label"] == ERROR and r["score"] == "" and "not finite" in r["error"] for r in rows)
    assert not {r["label"] for r in rows} & set(CLASSES)


def test_threshold_treats_nan_as_below():
    probs = np.array([[np.nan, np.nan], [0.1, 0.9]], dtype=np.float32)
    assert mark_uncertain(probs, ["ok", "dent"], 0.5) == [UNCERTAIN, "dent"]
    rows = prediction_rows([Path("a.png"), Path("b.png")], probs, ["ok", "dent"], top_k=2, threshold=0.5)
    assert [r[1] for r in rows] == [ERROR, "dent"]  # and a CSV row never labels NaN


def test_non_finite_settings_are_refused_before_any_folder_exists(tmp_path, capsys):
    data = tmp_path / "data"
    for name in ("a", "b"):
        _images(data / name, 4)
    for setting in ("train.lr=inf", "train.lr=.nan", "train.weight_decay=-.inf", "data.mean=[.nan]"):
        err = _one_line(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--set", setting])
        assert setting.split("=")[0] in err
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- item 5: metadata against the graph


def _with_metadata(tmp_path: Path, name: str, value) -> Path:
    path = make_classifier(tmp_path / f"{name}.onnx", make_metadata())
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == PREFIX + name:
            prop.value = json.dumps(value)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("name, value, expected", [
    ("class_names", ["ok", "scratch"], "outputs 3 scores but its metadata names 2 classes"),
    ("class_names", ["ok", "scratch", "dent", "rust", "pit", "hole"], "outputs 3 scores but its metadata names 6"),
    ("class_names", ["ok", "ok", "dent"], "duplicates"),
    ("class_names", "ok,scratch,dent", "class_names must be"),
    ("mean", ["0.4", "0.4", "0.4"], "mean"),
    ("std", [0.2, None, 0.2], "std"),
    ("std", [0.2, 0.0, 0.2], "std"),
    ("input_size", ["24", "24"], "input_size"),
    ("input_size", 24, "input_size"),
    ("channels", "3", "channels"),
])
def test_metadata_that_lies_is_one_line(tmp_path, capsys, name, value, expected):
    model_path = _with_metadata(tmp_path, name, value)
    _images(tmp_path / "images")
    err = _one_line(capsys, ["predict", str(model_path), str(tmp_path / "images")])
    assert expected in err and str(model_path) in err


def test_nan_std_is_one_line(tmp_path, capsys):
    path = make_classifier(tmp_path / "m.onnx", make_metadata())
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == PREFIX + "std":
            prop.value = "[0.2, NaN, 0.2]"  # what json.dumps writes for float("nan")
    onnx.save(proto, str(path))
    with pytest.raises(VisionFTError, match="std .* must be 3 finite numbers"):
        load_model(path)


def test_quantize_refuses_a_model_of_another_run(tmp_path):
    model_path = make_classifier(tmp_path / "model.onnx", make_metadata())
    six = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    with pytest.raises(VisionFTError, match="classifies 3 classes .* has 6"):
        check_model_belongs_to_run(model_path, six, {"train": []}, tmp_path)
    with pytest.raises(VisionFTError, match="trained on another split"):
        check_model_belongs_to_run(model_path, list(CLASSES), {"train": []}, tmp_path)


# ---------------------------------------------------------------- item 6: bounded memory

# VmHWM, the process's peak resident memory; unlike ru_maxrss it does not carry over the peak
# of the parent (pytest) that forked it.
_PEAK_MEMORY = ("print(next(int(line.split()[1]) // 1024 for line in open('/proc/self/status') "
                "if line.startswith('VmHWM')))")


@pytest.fixture
def linux_only():
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")


def _peak_mb_of(code: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", code + "\n" + _PEAK_MEMORY], capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]), "\n".join(lines[:-1]) + done.stderr


def test_yaml_alias_bomb_is_refused_within_bounded_memory(tmp_path, linux_only):
    bomb = tmp_path / "bomb.yaml"
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    bomb.write_text("\n".join(levels) + "\ndata: {augment: {train: *l8}}\n")  # 9**9 = 387 M values, 400 bytes
    peak, output = _peak_mb_of(f"from vision_ft.cli import main; print(main(['train', '--config', {str(bomb)!r}]))")
    assert output.startswith("2") and "expands to more than 10000 values" in output
    assert peak < 1000, f"{peak} MB"  # the unbounded version passed 4 GB


def test_values_quoted_in_errors_are_capped():
    from vision_ft.config import validate_config

    with pytest.raises(VisionFTError) as error:
        validate_config({"data": {"image_size": "9" * 1_000_000 + "x"}})
    assert len(str(error.value)) < 300


def _streamed_png(path: Path, width: int, height: int) -> None:
    """An all-white RGBA PNG written row by row: 676 MB of pixels in under 1 MB, without the RAM."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * (width * 4)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_huge_png_is_refused_from_its_header(tmp_path, linux_only):
    huge = tmp_path / "huge.png"
    _streamed_png(huge, 13000, 13000)
    peak, output = _peak_mb_of(f"from vision_ft.data.decode import decode_problem; print(decode_problem({str(huge)!r}))")
    assert "13000 x 13000 pixels, more than the limit of 40000000" in output
    assert peak < 600, f"{peak} MB"  # decoding it took 3.2 GB


def test_a_large_jpeg_is_drafted_under_the_limit(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR))
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    full = load_image(path, 3, 64, max_pixels=20_000_000)
    drafted = load_image(path, 3, 64, max_pixels=4_000_000)  # 12 MP: decoded at half scale
    assert drafted.shape == full.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3
    assert "more than the limit of 100000" in decode_problem(path, max_pixels=100_000)  # even 1/8 is too big


# ---------------------------------------------------------------- item 7: the dataset is what the folder says


def test_a_symlink_into_another_class_is_refused(tmp_path):
    data = tmp_path / "data"
    _images(data / "ok")
    _images(data / "scratch")
    (data / "ok" / "more").symlink_to(data / "scratch", target_is_directory=True)
    with pytest.raises(VisionFTError) as error:
        discover(data)
    message = str(error.value)
    assert "same file" in message and "two classes" in message and "scratch" in message and "\n" not in message


def test_a_symlink_loop_and_a_linked_file_inside_one_class_count_once(tmp_path):
    data = tmp_path / "data"
    _images(data / "ok")
    _images(data / "scratch")
    (data / "ok" / "loop").symlink_to(data / "ok", target_is_directory=True)
    (data / "scratch" / "again.png").symlink_to(data / "scratch" / "0.png")
    index = discover(data)
    assert len(index.samples) == 6
    assert {p.name for p, why in index.skipped if why.startswith("same file as")} == {"again.png"} or \
        {p.name for p, why in index.skipped if why.startswith("same file as")} == {"0.png"}


def test_the_same_file_in_train_and_test_is_refused(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("ok", "scratch"):
            _images(data / split / name)
    (data / "test" / "ok" / "leak.png").symlink_to(data / "train" / "ok" / "1.png")
    with pytest.raises(VisionFTError, match="two splits"):
        discover(data)


def test_the_same_file_listed_twice_in_a_csv_is_refused(tmp_path):
    _images(tmp_path / "a")
    (tmp_path / "link.png").symlink_to(tmp_path / "a" / "0.png")
    (tmp_path / "list.csv").write_text("path,label\na/0.png,ok\na/1.png,ok\nlink.png,scratch\na/2.png,scratch\n")
    with pytest.raises(VisionFTError, match="line 4: link.png is already listed on line 2"):
        discover(tmp_path / "list.csv")


def test_run_folders_and_hidden_folders_are_never_classes(tmp_path):
    data = tmp_path / "data"
    _images(data / "ok")
    _images(data / "scratch")
    run = create_run_folder(data / "run1").root  # `--out data/run1`
    (run / "plots").mkdir()
    Image.new("RGB", (8, 8)).save(run / "plots" / "confusion_test.png")
    nested = create_run_folder(data / "ok" / "old-run").root
    Image.new("RGB", (8, 8)).save(nested / "curve.png")
    _images(data / ".cache")
    index = discover(data)
    assert index.class_names == ["ok", "scratch"] and len(index.samples) == 6
    assert (run, "a vision-ft run folder, not a class") in index.skipped


# ---------------------------------------------------------------- item 8: options the command has


def test_predict_skips_bad_images_on_request_and_lists_them(tmp_path, capsys):
    model_path = make_classifier(tmp_path / "model.onnx", make_metadata())
    folder = tmp_path / "images"
    _images(folder, 2)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    err = _one_line(capsys, ["predict", str(model_path), str(folder)])
    assert "broken.png" in err and "--skip-bad-images" in err
    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_path), str(folder), "--out", str(out), "--skip-bad-images"]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert len(rows) == 3
    assert rows["broken.png"]["label"] == ERROR and rows["broken.png"]["error"].startswith("skipped: ")
    assert all(rows[f"{i}.png"]["label"] in CLASSES and rows[f"{i}.png"]["error"] == "" for i in range(2))


def test_a_torchscript_pth_is_one_line_without_a_torch_warning(tmp_path, capsys):
    import torch

    path = tmp_path / "scripted.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _one_line(capsys, ["weights", "import", str(path), "--model", "resnet18", "--out", str(tmp_path / "o.safetensors")])
    assert "TorchScript archive" in err
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


def test_decode_errors_name_only_options_the_command_has(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(VisionFTError) as error:
        load_image(broken)  # the runtime and export have no --skip-bad-images
    assert "--skip-bad-images" not in str(error.value)
