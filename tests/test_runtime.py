"""The torch-free ONNX runtime: preprocessing parity, inputs, metadata, bad files, --threshold.

Most tests use a small hand-built ONNX classifier (global average pool + linear layer) that
carries vision-ft metadata, so they run in seconds without exporting a network.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from vision_ft.cli import main
from vision_ft.data.decode import load_image
from vision_ft.errors import VisionFTError
from vision_ft.onnx_metadata import FORMAT_KEY, METADATA_FORMAT, ModelMetadata, read_metadata, write_metadata
from vision_ft.runtime import UNCERTAIN, load_model, mark_uncertain

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ok", "scratch", "dent"]


def make_metadata(channels: int = 3, size: tuple[int, int] = (24, 24)) -> ModelMetadata:
    return ModelMetadata(
        class_names=list(CLASSES),
        input_size=list(size),
        channels=channels,
        mean=[0.485, 0.456, 0.406][:channels] if channels == 3 else [0.5],
        std=[0.229, 0.224, 0.225][:channels] if channels == 3 else [0.25],
        backbone="handmade",
        vision_ft_version="0.1.0",
        split_fingerprint="0123456789abcdef",
    )


def make_classifier(path: Path, metadata: ModelMetadata | None = None, channels: int = 3, size=(24, 24)) -> Path:
    """GlobalAveragePool -> Flatten -> Gemm: logits from the mean of each normalised channel."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 3, (channels, len(CLASSES))).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.array([0.2, -0.1, 0.0], np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
        ],
        "handmade",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, *size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if metadata is not None:
        write_metadata(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    """Images in the modes a line camera or a PACS export produces."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    made = []
    arrays = {
        "rgb.png": rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
        "grey.jpg": rng.integers(0, 256, (50, 50), dtype=np.uint8),
        "alpha.png": rng.integers(0, 256, (20, 36, 4), dtype=np.uint8),
        "wide16.png": (rng.integers(0, 65536, (16, 64), dtype=np.uint16)),
    }
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
        made.append(folder / name)
    return made


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    return make_classifier(tmp_path / "model.onnx", make_metadata())


def test_preprocessing_equals_the_training_eval_pipeline(images, tmp_path):
    from vision_ft.data.transforms import build_transforms

    for channels, size in ((3, (24, 24)), (1, (32, 32))):
        meta = make_metadata(channels, size)
        model = load_model(make_classifier(tmp_path / f"m{channels}.onnx", meta, channels, size))
        transform = build_transforms([], meta.mean, meta.std, train=False)
        expected = np.stack([transform(image=load_image(p, channels, size))["image"].numpy() for p in images])
        got = model.preprocess(images)
        assert got.shape == expected.shape == (len(images), channels, *size)
        assert got.dtype == np.float32
        # Both round (v/255 - mean)/std to float32 once; they differ by at most 1 ulp.
        assert np.abs(got - expected).max() <= 5e-7


def test_real_images_preprocess_like_training(neu_det, tmp_path):
    from vision_ft.data.transforms import build_transforms

    paths = sorted((neu_det / "scratches").glob("*.jpg"))[:4] + sorted((neu_det / "patches").glob("*.jpg"))[:4]
    meta = make_metadata(3, (64, 64))
    model = load_model(make_classifier(tmp_path / "m.onnx", meta, 3, (64, 64)))
    transform = build_transforms([], meta.mean, meta.std, train=False)
    expected = np.stack([transform(image=load_image(p, 3, 64))["image"].numpy() for p in paths])
    assert np.abs(model.preprocess(paths) - expected).max() <= 5e-7


def test_paths_arrays_and_pillow_images_give_the_same_probabilities(model_path, images):
    model = load_model(model_path)
    path = images[0]
    array = np.asarray(Image.open(path))
    with Image.open(path) as pil:
        pil.load()
        from_pil = model.predict_proba([pil])
    from_path = model.predict_proba([str(path)])
    from_array = model.predict_proba([array])
    assert np.array_equal(from_path, from_array) and np.array_equal(from_path, from_pil)
    np.testing.assert_allclose(from_path.sum(axis=1), 1.0, atol=1e-9)


def test_batching_does_not_change_results(model_path, images):
    model = load_model(model_path)
    done = []
    one_batch = model.predict_proba(images, batch_size=len(images))
    in_ones = model.predict_proba(images, batch_size=1, progress=done.append)
    np.testing.assert_allclose(one_batch, in_ones, atol=1e-6)
    assert done == [1] * len(images)
    assert model.predict_proba([]).shape == (0, len(CLASSES))


def test_runtime_never_imports_torch(model_path, images):
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from vision_ft.runtime import load_model\n"
        "model = load_model(sys.argv[1])\n"
        "preds = model.predict([sys.argv[2], np.zeros((30, 40, 3), np.uint8), Image.open(sys.argv[2])])\n"
        "assert len(preds) == 3 and all(p.label in model.class_names for p in preds)\n"
        "heavy = ('torch', 'torchvision', 'timm', 'albumentations', 'albucore', 'cv2', 'tqdm', 'onnx')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(model_path), str(images[0])],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_metadata_round_trips(tmp_path):
    meta = replace(make_metadata(), verified_max_abs_diff=3.5e-6, extra={"calibration_images": 16})
    assert ModelMetadata.from_properties(meta.to_properties(), "x") == meta
    path = make_classifier(tmp_path / "m.onnx", meta)
    assert load_model(path).metadata == meta
    assert read_metadata(onnx.load(str(path)), str(path)) == meta


def test_write_metadata_replaces_ours_and_keeps_other_tools_entries(tmp_path):
    proto = onnx.load(str(make_classifier(tmp_path / "m.onnx", make_metadata())))
    proto.metadata_props.add(key="author", value="line 3")
    write_metadata(proto, replace(make_metadata(), quantization="int8-static-qdq"))
    keys = [p.key for p in proto.metadata_props]
    assert keys.count(FORMAT_KEY) == 1 and "author" in keys
    assert read_metadata(proto, "m").quantization == "int8-static-qdq"


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what earlier commands printed (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_model_files_fail_with_one_line(tmp_path, images, capsys):
    folder = str(images[0].parent)
    missing = tmp_path / "missing.onnx"
    random_bytes = tmp_path / "random.onnx"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(2000))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    good = make_classifier(tmp_path / "good.onnx", make_metadata())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    plain = make_classifier(tmp_path / "plain.onnx", None)
    future = tmp_path / "future.onnx"
    proto = onnx.load(str(good))
    for prop in proto.metadata_props:
        if prop.key == FORMAT_KEY:
            prop.value = json.dumps(METADATA_FORMAT + 1)
    onnx.save(proto, str(future))

    assert "does not exist" in _one_line_error(capsys, ["predict", str(missing), folder])
    for bad in (random_bytes, empty, truncated):
        assert "not a readable ONNX model" in _one_line_error(capsys, ["predict", str(bad), folder])
    assert "no vision-ft metadata" in _one_line_error(capsys, ["predict", str(plain), folder])
    assert "newer vision-ft" in _one_line_error(capsys, ["predict", str(future), folder])
    with pytest.raises(VisionFTError, match="is a folder"):
        load_model(tmp_path)


def test_predict_cli_writes_the_run_folder_columns(model_path, images, tmp_path):
    from vision_ft.predict import prediction_header

    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_path), str(images[0].parent), "--out", str(out), "--top-k", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == prediction_header(len(CLASSES))  # top-k is capped at the class count
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in images)
    model = load_model(model_path)
    probs = model.predict_proba(sorted(images))
    for row, p in zip(sorted(rows, key=lambda r: r["path"]), probs):
        assert row["label"] == CLASSES[int(np.argmax(p))]
        assert abs(float(row["score"]) - p.max()) < 1e-6


def test_threshold_sends_low_confidence_images_to_uncertain(model_path, images, tmp_path, capsys):
    model = load_model(model_path)
    scores = np.sort(model.predict_proba(images).max(axis=1))
    threshold = float((scores[0] + scores[-1]) / 2)  # some images above, some below
    predictions = model.predict(images, threshold=threshold)
    assert {p.label for p in predictions if p.score < threshold} == {UNCERTAIN}
    assert all(p.label == p.top_class for p in predictions if p.score >= threshold)

    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_path), str(images[0].parent), "--out", str(out), "--threshold", f"{threshold:.6f}"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["label"] for r in rows if float(r["score"]) < threshold} == {UNCERTAIN}
    assert all(r["label"] == r["top1_label"] for r in rows if float(r["score"]) >= threshold)
    assert "probability" in _one_line_error(capsys, ["predict", str(model_path), str(images[0]), "--threshold", "1.5"])


def test_mark_uncertain_labels_rows_of_probabilities_and_the_csv_keeps_the_ranking():
    from vision_ft.predict import prediction_rows

    names = ["ok", "dent", "scratch"]
    probs = np.array([[0.40, 0.35, 0.25], [0.05, 0.90, 0.05]], dtype=np.float32)
    assert mark_uncertain(probs, names, 0.5) == [UNCERTAIN, "dent"]
    assert mark_uncertain(probs, names, None) == ["ok", "dent"]
    rows = prediction_rows([Path("a.png"), Path("b.png")], probs, names, top_k=2, threshold=0.5)
    assert rows == [["a.png", UNCERTAIN, "0.400000", "ok", "0.400000", "dent", "0.350000", ""],
                    ["b.png", "dent", "0.900000", "dent", "0.900000", "ok", "0.050000", ""]]
