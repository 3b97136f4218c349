"""`train --task anomaly` to the shipped model: run folder, ONNX agreeing with torch on scores and
maps, the torch-free detector, `predict --heatmaps` and `eval` (real NEU-DET textures)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.real_data import NEU, needs_neu
from vision_ft.cli import main

pytestmark = [pytest.mark.slow, needs_neu]


def _copy(root: Path, name: str, neu_class: str, count: int) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for image in sorted((NEU / neu_class).glob("*.jpg"))[:count]:
        shutil.copy(image, root / name / image.name)


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("anomaly")
    data = root / "data"
    _copy(data, "good", "rolled-in_scale", 30)
    _copy(data, "scratches", "scratches", 8)
    _copy(data, "inclusion", "inclusion", 8)
    run = root / "run"
    code = main(["train", "--task", "anomaly", "--data", str(data), "--model", "resnet18", "--weights", "none",
                 "--out", str(run), "--set", "data.image_size=64", "--set", "data.workers=0",
                 "--set", "anomaly.threshold_rule=target_recall", "--set", "anomaly.target_recall=0.9"])
    assert code == 0
    return run, data


def test_run_folder_holds_model_metrics_plots_and_the_threshold_reason(anomaly_run: tuple[Path, Path]) -> None:
    run, _ = anomaly_run
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert all(label == split["class_names"].index("good") for _, label in split["splits"]["train"])  # good only
    for name in ("val", "test"):
        m = metrics[name]
        assert 0.0 <= m["auroc"] <= 1.0 and m["num_defective"] > 0 and m["num_good"] > 0
        assert set(m["per_defect_class"]) == {"scratches", "inclusion"}
        assert np.asarray(m["confusion_matrix"]).sum() == m["num_samples"]
        assert (run / "plots" / f"scores_{name}.png").is_file()
        interval = m["ci"]["auroc"]  # the evaluation layer's bootstrap
        assert interval["low"] <= m["auroc"] <= interval["high"] and set(m["ci"]) >= {"f1", "recall", "precision"}
    assert metrics["val"]["recall"] >= 0.9  # the rule asked for
    report = (run / "report.md").read_text()
    assert "target_recall" in report and "at least 90% of the defects" in report and "threshold is 0.5" in report


def test_onnx_scores_and_maps_agree_with_torch(anomaly_run: tuple[Path, Path]) -> None:
    from vision_ft.anomaly.predict import predict_anomaly_run
    from vision_ft.anomaly.runtime import OnnxAnomalyDetector
    from vision_ft.predict import collect_images
    from vision_ft.runtime import load_model

    run, data = anomaly_run
    images = collect_images(data)
    model = load_model(run / "model.onnx")
    assert isinstance(model, OnnxAnomalyDetector)
    onnx_scores, onnx_maps = model.scores_and_maps(images, batch_size=7)
    torch_scores, torch_maps, _ = predict_anomaly_run(run, images)
    assert onnx_maps.shape == (len(images), 64, 64)
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)
    np.testing.assert_allclose(onnx_maps, torch_maps, atol=1e-4)
    predictions = model.predict(images[:3])
    assert {p.label for p in predictions} <= {"good", "defective", "uncertain"}
    assert predictions[0].heatmap.shape == (64, 64) and 0.0 < predictions[0].score < 1.0


def test_detector_needs_no_torch(anomaly_run: tuple[Path, Path]) -> None:
    run, data = anomaly_run
    image = next((data / "scratches").iterdir())
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from vision_ft.runtime import load_model\n"
        f"p = load_model({str(run / 'model.onnx')!r}).predict_one({str(image)!r})\n"
        "print(p.label, p.heatmap.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in {"good", "defective", "uncertain"}


def test_predict_writes_overlaid_heatmaps_and_eval_reports(anomaly_run: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run, data = anomaly_run
    out = tmp_path / "heat"
    assert main(["predict", str(run / "model.onnx"), str(data / "scratches"), "--heatmaps", str(out),
                 "--out", str(tmp_path / "p.csv")]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 8
    assert Image.open(pngs[0]).size == (200, 200)  # drawn over the image at its own size
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,label,score" and len(rows) == 9
    # A second run into the same folder would replace the PNGs: refused in one line.
    assert main(["predict", str(run), str(data / "scratches"), "--heatmaps", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["predict", str(run), str(data / "scratches"), "--threshold", "0.8"]) == 2
    assert "own threshold" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(data), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_samples"] == 46 and evaluated["auroc"] is not None
    assert (tmp_path / "eval.png").is_file()
