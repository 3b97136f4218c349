"""Classifier heatmaps end to end: the exported CNN carries a 'cam' output that agrees with torch,
and `predict --heatmaps` draws them from the ONNX model (no torch) and from the run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.real_data import NEU, needs_neu
from vision_ft.cli import main

pytestmark = [pytest.mark.slow, needs_neu]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cam")
    data = root / "data"
    for name in ("scratches", "patches"):
        (data / name).mkdir(parents=True)
        for image in sorted((NEU / name).glob("*.jpg"))[:10]:
            shutil.copy(image, data / name / image.name)
    run = root / "run"
    assert main(["train", "--data", str(data), "--model", "resnet18", "--weights", "none", "--out", str(run),
                 "--set", "data.image_size=64", "--set", "data.workers=0", "--set", "train.epochs=1",
                 "--set", "train.batch_size=8"]) == 0
    return run, data


def test_exported_cam_output_matches_torch(classifier_run: tuple[Path, Path]) -> None:
    import torch

    from vision_ft.heatmaps.cam import CamClassifier
    from vision_ft.predict import collect_images
    from vision_ft.run_model import load_run
    from vision_ft.runtime import load_model

    run, data = classifier_run
    model = load_model(run / "model.onnx")
    assert model.metadata.extra["cam_output"] == "cam"
    images = collect_images(data / "scratches")[:4]
    batch = model.preprocess(images)
    logits, cams = model.session.run(["logits", "cam"], {"image": batch})
    with torch.no_grad():
        expected_logits, expected_cams = CamClassifier(load_run(run).model)(torch.from_numpy(batch))
    np.testing.assert_allclose(cams, expected_cams.numpy(), atol=1e-3)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-3)
    probs, maps = model.probabilities_and_maps(images, batch_size=3)
    assert probs.shape == (4, 2) and len(maps) == 4 and maps[0].shape == (2, 2)


def test_predict_draws_heatmaps_from_onnx_and_from_the_run(classifier_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = classifier_run
    for source, out in ((run / "model.onnx", tmp_path / "onnx"), (run, tmp_path / "torch")):
        assert main(["predict", str(source), str(data / "patches"), "--heatmaps", str(out),
                     "--out", str(tmp_path / f"{out.name}.csv")]) == 0
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 10 and Image.open(pngs[0]).size == (200, 200)
    onnx_rows = (tmp_path / "onnx.csv").read_text().splitlines()
    torch_rows = (tmp_path / "torch.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in onnx_rows] == [r.split(",")[1] for r in torch_rows]  # same labels
