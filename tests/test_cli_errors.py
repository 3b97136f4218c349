"""Every user mistake ends in one clear line on stderr and exit code 2, never a traceback."""

from pathlib import Path

import numpy as np
from PIL import Image

from vision_ft.cli import main

QUICK = ["--set", "export.onnx=false", "--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.epochs=1",
         "--set", "train.batch_size=8", "--weights", "none"]


def _make_folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    line = err[-1]
    assert line.startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    return line


def _train(args, capsys) -> str:
    assert main(["train", *args, *QUICK]) == 2
    return _error_line(capsys)


def test_missing_and_empty_data(tmp_path, capsys):
    assert "does not exist" in _train(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r1")], capsys)
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in _train(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")], capsys)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_one_class_only(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 6})
    line = _train(["--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert "class" in line and "ok" in line


def test_empty_class_folder_is_named(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 6, "scratch": 6})
    (data / "dent").mkdir()
    line = _train(["--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert "dent" in line


def test_corrupt_and_truncated_images_are_listed_then_skippable(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 8, "scratch": 8})
    (data / "ok" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = data / "scratch" / "0.png"
    Image.open(good).save(data / "scratch" / "full.jpg")
    raw = (data / "scratch" / "full.jpg").read_bytes()
    (data / "scratch" / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "scratch" / "full.jpg").unlink()
    line = _train(["--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert "2 unreadable images" in line and "broken.jpg" in line and "cut.jpg" in line
    assert "--skip-bad-images" in line
    assert not (tmp_path / "r").exists()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--skip-bad-images", *QUICK]) == 0


def test_non_image_files_are_skipped_not_fatal(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 8, "scratch": 8})
    (data / "ok" / "notes.txt").write_text("inspector's notes")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), *QUICK]) == 0
    assert "notes.txt" in capsys.readouterr().err


def test_unknown_model_suggests_names(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 6, "scratch": 6})
    line = _train(["--data", str(data), "--model", "resnet5O", "--out", str(tmp_path / "r")], capsys)
    assert "unknown model 'resnet5O'; did you mean resnet50" in line


def test_weights_that_do_not_fit(tmp_path, capsys):
    import timm
    import torch

    data = _make_folder(tmp_path / "d", {"ok": 6, "scratch": 6})
    weights = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), weights)
    assert main(["train", "--data", str(data), "--model", "resnet18", "--out", str(tmp_path / "r"),
                 *QUICK[:-2], "--weights", str(weights)]) == 2
    assert "hold 80 tensors the model does not have (first: 'layer1.2.conv1.weight')" in _error_line(capsys)
    # The failed run left no folder behind, so the corrected command needs no --force.
    assert not (tmp_path / "r").exists()
    assert main(["train", "--data", str(data), "--model", "resnet18", "--out", str(tmp_path / "r"), *QUICK]) == 0


def test_bad_config_key_and_value(tmp_path, capsys):
    data = _make_folder(tmp_path / "d", {"ok": 6, "scratch": 6})
    assert "did you mean 'train.epochs'" in _train(["--data", str(data), "--set", "train.epohcs=2"], capsys)
    assert "data.balance" in _train(["--data", str(data), "--set", "data.balance=yes"], capsys)
    assert "HorizntalFlip" in _train(["--data", str(data), "--out", str(tmp_path / "r"),
                                      "--set", "data.augment.train=[{name: HorizntalFlip}]"], capsys)


def test_resume_without_a_run(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_eval_and_predict_on_bad_paths(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a vision-ft run folder" in _error_line(capsys)
    assert main(["predict", str(tmp_path / "none"), str(tmp_path)]) == 2
    assert "does not exist" in _error_line(capsys)


def test_csv_manifest_of_mixed_formats_trains_single_channel(tmp_path, capsys):
    """16-bit PNG/TIFF, RGBA, palette and EXIF-rotated JPEG all feed one grey model."""
    rng = np.random.default_rng(1)
    rows = ["path,label"]
    for i in range(6):
        for label, make in (
            ("a", lambda: Image.fromarray(rng.integers(0, 65535, (36, 30), dtype=np.uint16))),
            ("a", lambda: Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA")),
            ("b", lambda: Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).convert("P")),
            ("b", lambda: Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))),
        ):
            image = make()
            suffix = ".tiff" if image.mode == "I;16" and i % 2 else ".png"
            name = f"img/{label}_{i}_{image.mode}{suffix}"
            if image.mode == "RGB":
                name = f"img/{label}_{i}_rot.jpg"
                exif = Image.Exif()
                exif[0x0112] = 6  # rotated 90°
                (tmp_path / "img").mkdir(exist_ok=True)
                image.save(tmp_path / name, exif=exif)
            else:
                (tmp_path / "img").mkdir(exist_ok=True)
                image.save(tmp_path / name)
            rows.append(f"{name},{label}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(manifest), "--out", str(out), "--set", "data.channels=1", *QUICK]) == 0
    assert "test (best epoch 1)" in capsys.readouterr().out
    import timm  # noqa: F401  (the model was built with one input channel)
    from safetensors.torch import load_file

    assert load_file(str(out / "checkpoints/best/model.safetensors"))["conv1.weight"].shape[1] == 1


def test_command_line_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--bogus"]) == 2
    assert "No such option: --bogus" in _error_line(capsys)
    assert main(["nosuch"]) == 2
    assert "No such command 'nosuch'" in _error_line(capsys)
    assert main(["train", "--data"]) == 2
    assert "'--data' requires an argument" in _error_line(capsys)
    # Two overrides after one --set: the message says how --set works.
    assert main(["train", "--data", str(tmp_path), "--set", "train.epochs=1", "train.lr=0.1"]) == 2
    assert "repeat it for each" in _error_line(capsys)
