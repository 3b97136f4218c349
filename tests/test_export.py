"""`vision-ft export` / `quantize` end to end on a tiny run trained on real NEU-DET images, and
LoRA exports (a LoRA run folder; ViT and EfficientNet models with depthwise adapters merged)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from tests.real_data import RUN_CLASSES as CLASSES, RUN_PER_CLASS as PER_CLASS
from vision_ft.cli import main
from vision_ft.data.split import load_split
from vision_ft.export import OPSET, TOLERANCE, attach_metadata, merge_adapters, partial_path, save_checked, to_onnx, torch_logits
from vision_ft.onnx_metadata import ModelMetadata, read_metadata
from vision_ft.run_model import load_run
from vision_ft.runtime import UNCERTAIN, load_model, open_session

pytestmark = pytest.mark.slow


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """Exit code and stdout of a `vision-ft` command (usable from module-scoped fixtures)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def _allowed(expected: np.ndarray) -> float:
    return TOLERANCE * max(1.0, float(np.abs(expected).max()) / 10.0)


@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared trained run without the ONNX model training wrote, for `export` to write."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("*.onnx"))
    return run


@pytest.fixture(scope="module")
def export_output(exported_run) -> str:
    """`vision-ft export RUN --int8`: RUN/model.onnx and RUN/model.int8.onnx."""
    code, text = _run_cli(["export", str(exported_run), "--int8", "--calibration-images", "12"])
    assert code == 0, text
    return text


def test_export_equals_the_model_training_exported(trained_run, exported_run, export_output):
    """Training exports the model in memory; `vision-ft export` rebuilds it from the checkpoint."""
    from_training = load_model(trained_run / "model.onnx")
    from_checkpoint = load_model(exported_run / "model.onnx")
    assert from_training.metadata == from_checkpoint.metadata
    _, splits = load_split(trained_run / "split.json")
    images = [s.path for s in splits["test"]]
    batch = from_training.preprocess(images)
    assert np.abs(from_training.logits(batch) - from_checkpoint.logits(batch)).max() < 1e-5


def test_export_writes_a_checked_model_with_metadata(exported_run, export_output):
    path = exported_run / "model.onnx"
    assert "max |logit diff|" in export_output and "top-1 agreement" in export_output
    assert f"wrote {path} (opset {OPSET}" in export_output
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", OPSET)}
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis

    loaded = load_run(exported_run)
    split = json.loads((exported_run / "split.json").read_text())
    meta = read_metadata(proto, str(path))
    assert meta.class_names == list(CLASSES) == split["class_names"]
    assert (meta.input_size, meta.channels, meta.backbone) == ([64, 64], 3, "resnet18")
    assert meta.mean == pytest.approx(loaded.mean) and meta.std == pytest.approx(loaded.std)
    assert meta.split_fingerprint == split["fingerprint"]
    assert meta.finetune_strategy == "full" and meta.quantization == "none"
    assert meta.verified_max_abs_diff is not None and meta.verified_max_abs_diff <= TOLERANCE
    assert load_model(path).metadata == meta  # the runtime reads what export wrote


def test_existing_model_is_not_overwritten_without_force(exported_run, export_output, capsys):
    before = (exported_run / "model.onnx").read_bytes()
    assert main(["export", str(exported_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert (exported_run / "model.onnx").read_bytes() == before


def test_failed_verification_leaves_no_model_behind(exported_run, tmp_path, monkeypatch, capsys):
    import vision_ft.export as export_module

    real = export_module.torch_logits
    # An exporter bug, simulated: onnxruntime and torch now disagree by 0.5 per logit.
    monkeypatch.setattr(export_module, "torch_logits", lambda *args: real(*args) + 0.5)
    out = tmp_path / "model.onnx"
    assert main(["export", str(exported_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export check failed") and "\n" not in err
    assert not out.exists() and not partial_path(out).exists()
    assert list(tmp_path.iterdir()) == []


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {row["path"]: row for row in csv.DictReader(path.open())}


def test_onnx_predictions_equal_run_predictions_and_eval(exported_run, export_output, neu_subset, tmp_path):
    by_run, by_onnx, metrics = tmp_path / "run.csv", tmp_path / "onnx.csv", tmp_path / "eval.json"
    assert main(["predict", str(exported_run), str(neu_subset), "--out", str(by_run)]) == 0
    assert main(["predict", str(exported_run / "model.onnx"), str(neu_subset), "--out", str(by_onnx), "--batch-size", "7"]) == 0
    run_rows, onnx_rows = _read_csv(by_run), _read_csv(by_onnx)
    assert list(next(iter(run_rows.values()))) == list(next(iter(onnx_rows.values())))
    assert run_rows.keys() == onnx_rows.keys() and len(onnx_rows) == len(CLASSES) * PER_CLASS
    for path, row in run_rows.items():
        assert onnx_rows[path]["label"] == row["label"], path
        for k in (1, 2, 3):
            assert abs(float(onnx_rows[path][f"top{k}_score"]) - float(row[f"top{k}_score"])) <= 1e-5

    assert main(["eval", str(exported_run), "--data", str(neu_subset), "--out", str(metrics)]) == 0
    truth = {path: Path(path).parent.name for path in onnx_rows}
    onnx_accuracy = np.mean([onnx_rows[p]["label"] == truth[p] for p in truth])
    assert json.loads(metrics.read_text())["accuracy"] == pytest.approx(onnx_accuracy)


def test_threshold_sends_low_confidence_images_to_uncertain(exported_run, export_output, neu_subset, tmp_path):
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    folder = str(neu_subset / "scratches")
    assert main(["predict", str(exported_run / "model.onnx"), folder, "--out", str(plain)]) == 0
    scores = sorted(float(r["score"]) for r in _read_csv(plain).values())
    threshold = (scores[0] + scores[-1]) / 2
    assert main(["predict", str(exported_run / "model.onnx"), folder, "--out", str(marked), "--threshold", str(threshold)]) == 0
    for path, row in _read_csv(marked).items():
        expected = UNCERTAIN if float(row["score"]) < threshold else row["top1_label"]
        assert row["label"] == expected, path
    assert UNCERTAIN in {r["label"] for r in _read_csv(marked).values()}


def test_int8_model_is_reported_and_loads_in_the_runtime(exported_run, export_output, tmp_path, capsys):
    int8 = exported_run / "model.int8.onnx"
    tests = len(json.loads((exported_run / "split.json").read_text())["splits"]["test"])
    assert "calibrating on 12 training images" in export_output
    assert f"accuracy on {tests} test images: fp32" in export_output and "top-1 agreement" in export_output
    assert "images/s" in export_output and "int8" in export_output
    model = load_model(int8)
    assert model.metadata.quantization == "int8-static-qdq"
    assert model.metadata.class_names == list(CLASSES)
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8)).graph.node)

    assert main(["quantize", str(exported_run)]) == 2  # model.int8.onnx exists
    assert "already exists" in capsys.readouterr().err
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(exported_run), "--out", str(out), "--calibration-images", "6"]) == 0
    assert f"accuracy on {tests} test images" in capsys.readouterr().out and out.is_file()


@pytest.fixture(scope="module")
def lora_run(exported_run, tmp_path_factory) -> Path:
    """The trained run turned into a LoRA run: adapters on every backbone conv with non-zero B."""
    lora = pytest.importorskip("vision_ft.finetune.lora")
    from vision_ft.checkpoint import save_checkpoint
    from vision_ft.config import load_config, save_config
    from vision_ft.finetune.build import build_strategy

    run = tmp_path_factory.mktemp("lora") / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*.onnx"))
    config = load_config(run / "config.yaml")
    config.finetune.strategy = "lora"
    save_config(config, run / "config.yaml")
    model = load_run(exported_run).model
    build_strategy(config.finetune).prepare(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in lora.lora_modules(model):
            module.lora_b.normal_(0.0, 0.05, generator=generator)
    save_checkpoint(run / "checkpoints" / "best", model, {"epoch": 1})
    return run


def test_lora_run_exports_merged_and_matches_the_unmerged_model(lora_run, exported_run):
    lora = pytest.importorskip("vision_ft.finetune.lora")
    code, text = _run_cli(["export", str(lora_run)])
    assert code == 0, text
    model = load_model(lora_run / "model.onnx")
    assert model.metadata.finetune_strategy == "lora"

    loaded = load_run(lora_run)  # adapters unmerged, as trained
    assert any(True for _ in lora.lora_modules(loaded.model))
    _, splits = load_split(lora_run / "split.json")
    images = [s.path for s in splits["val"] + splits["test"]]
    expected = torch_logits(loaded.model, images, model.metadata)
    got = model.logits(model.preprocess(images))
    assert np.abs(got - expected).max() <= _allowed(expected)
    base = torch_logits(load_run(exported_run).model, images, model.metadata)
    # The adapters matter (a 2-epoch model from scratch has small logits, hence the relative test).
    assert np.abs(expected - base).max() > 0.2 * np.abs(base).max()


@pytest.mark.parametrize(
    "name, kwargs, size",
    [("vit_tiny_patch16_224", {"img_size": 32}, 32), ("tf_efficientnet_lite0", {}, 48)],
    ids=["vit", "efficientnet"],
)
def test_lora_models_export_merged_and_agree_with_torch(name, kwargs, size, tmp_path):
    lora = pytest.importorskip("vision_ft.finetune.lora")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES), **kwargs).eval()
    lora.apply_lora(model, r=4, alpha=8)
    wrapped = [module for _, module in lora.lora_modules(model)]
    if "efficientnet" in name:
        assert any(getattr(m, "groups", 1) > 1 for m in wrapped)  # depthwise convs carry adapters
    with torch.no_grad():
        for module in wrapped:
            module.lora_b.normal_(0.0, 0.05)
        x = torch.randn(3, 3, size, size)
        expected = model(x).numpy()  # adapters unmerged

    merged = merge_adapters(model)
    assert not any(True for _ in lora.lora_modules(merged))
    metadata = ModelMetadata(class_names=list(CLASSES), input_size=[size, size], channels=3, mean=[0.5] * 3,
                             std=[0.5] * 3, backbone=name, vision_ft_version="test", split_fingerprint="none",
                             finetune_strategy="lora")
    proto = to_onnx(merged, 3, (size, size))
    attach_metadata(proto, metadata)
    path = tmp_path / "model.onnx"
    save_checked(proto, path)
    session = open_session(path)
    got = session.run(["logits"], {"image": x.numpy()})[0]
    single = session.run(["logits"], {"image": x[:1].numpy()})[0]
    assert np.abs(got - expected).max() <= _allowed(expected)
    assert np.abs(single[0] - expected[0]).max() <= _allowed(expected)
