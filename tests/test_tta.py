"""Test-time augmentation: the mirrors averaged, auto's choice on validation, and eval/predict
applying the run's choice."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.real_data import needs_neu
from vision_ft.cli import main
from vision_ft.config import Config
from vision_ft.inference import infer
from vision_ft.tta import apply_view, choose_tta, mirrors_in_augmentation


class _TopLeftQuadrant(nn.Module):
    """Logits from the top-left quadrant only: every mirror moves it elsewhere."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        corner = x[..., :h, :w].mean(dim=(1, 2, 3))
        return torch.stack([corner, -corner], dim=1)


@pytest.mark.parametrize("augment, expected", [
    (Config().data.augment.train, "flip_hv"),  # the default augmentation mirrors both ways
    ([{"name": "HorizontalFlip", "p": 0.5}, {"name": "Affine", "rotate": [-10, 10]}], "flip"),
    ([{"name": "VerticalFlip"}], "vflip"),
    ([{"name": "D4", "p": 1.0}], "flip_hv"),
    ([{"name": "HorizontalFlip", "p": 0.0}, {"name": "VerticalFlip", "p": 0.5}], "vflip"),  # p=0 mirrors nothing
    ([{"name": "RandomBrightnessContrast"}], "none"),
    ([], "none"),
])
def test_the_candidate_views_are_the_mirrors_the_training_augmentation_applies(augment, expected):
    assert mirrors_in_augmentation(augment) == expected


def test_flip_hv_averages_the_logits_of_the_image_and_its_three_mirrors():
    images = torch.zeros(2, 1, 4, 4)
    images[0, :, :2, :2] = 1.0  # image 0: bright top-left quadrant
    images[1, :, 2:, :2] = 4.0  # image 1: bright bottom-left quadrant
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1])), batch_size=2)
    model = _TopLeftQuadrant()
    averaged = infer(model, loader, torch.device("cpu"), tta="flip_hv").logits
    # Each mirror puts a different quadrant top-left; over all four, every quadrant is seen once.
    quadrant_means = images.reshape(2, 1, 2, 2, 2, 2).mean(dim=(1, 3, 5))  # (N, row half, column half)
    expected = quadrant_means.mean(dim=(1, 2))
    assert np.allclose(averaged[:, 0], expected.numpy(), atol=1e-6)
    assert np.allclose(averaged[:, 1], -expected.numpy(), atol=1e-6)
    # vflip sees the top-left and the bottom-left quadrants
    vflip = infer(model, loader, torch.device("cpu"), tta="vflip").logits[:, 0]
    assert np.allclose(vflip, quadrant_means[:, :, 0].mean(dim=1).numpy(), atol=1e-6)
    assert torch.equal(apply_view(images, "hv"), torch.rot90(images, 2, (2, 3)))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_auto_keeps_the_mirrors_only_when_they_validate_better():
    labels = np.array([0, 1, 1, 0])
    # The plain image gets image 2 wrong; its mirror gets it right by a wide margin.
    plain = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    mirrored = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 3.0], [2.0, 0.0]], dtype=np.float32)
    per_view = {"identity": plain, "h": mirrored}
    choice, before, after = choose_tta("flip", per_view, lambda z: _accuracy(z, labels), "accuracy")
    assert (choice, before, after) == ("flip", 0.75, 1.0)
    # A tie keeps the plain image: the views would cost time for nothing.
    swapped = {"identity": mirrored, "h": plain}
    assert choose_tta("flip", swapped, lambda z: _accuracy(z, labels), "accuracy") == ("none", 1.0, 1.0)
    worse = {"identity": mirrored, "h": np.array([[0.0, 9.0]] * 4, dtype=np.float32)}
    assert choose_tta("flip", worse, lambda z: _accuracy(z, labels), "accuracy")[0] == "none"
    # An undefined metric (AUROC on a one-class validation split) keeps the plain image.
    assert choose_tta("flip", per_view, lambda z: float("nan"), "auroc")[0] == "none"
    # Lower is better for the loss: a view that raises it is dropped.
    loss = {"identity": plain, "h": mirrored}
    assert choose_tta("flip", loss, lambda z: float(np.abs(z).sum()), "loss")[0] == "none"


@needs_neu
@pytest.mark.slow
def test_a_run_records_its_choice_and_eval_and_predict_apply_it(trained_run, tmp_path):
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    chosen = config["eval"]["tta"]
    assert chosen in ("none", "flip_hv")  # auto resolved: the default augmentation mirrors both ways
    report = (trained_run / "report.md").read_text()
    assert f"test-time augmentation: {chosen}" in report and "views" in report  # the reason, with both scores
    # `vision-ft eval` on the run's own test images gives the test metrics training reported,
    # which needs the same views.
    split = json.loads((trained_run / "split.json").read_text())
    manifest = tmp_path / "test.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for path, label in split["splits"]["test"]:
            writer.writerow([f"{split['root']}/{path}", split["class_names"][label]])
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--data", str(manifest), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    trained = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert evaluated["num_samples"] == trained["num_samples"]
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])


@needs_neu
@pytest.mark.slow
def test_eval_and_predict_use_the_views_the_run_chose(trained_run, neu_subset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"]["tta"] = "flip_hv"  # as if auto had kept the mirrors
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    import vision_ft.evaluate
    import vision_ft.run_predict

    asked: list[str] = []
    for module in (vision_ft.evaluate, vision_ft.run_predict):
        real = module.infer
        monkeypatch.setattr(module, "infer", lambda *a, _real=real, **k: asked.append(k.get("tta")) or _real(*a, **k))
    assert main(["eval", str(run), "--data", str(neu_subset), "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["predict", str(run), str(neu_subset / "scratches"), "--out", str(tmp_path / "p.csv")]) == 0
    assert asked == ["flip_hv", "flip_hv"]
    # The exported model has the views in its graph: onnxruntime predicts what torch does.
    assert main(["export", str(run), "--out", str(tmp_path / "tta.onnx")]) == 0
    assert main(["predict", str(tmp_path / "tta.onnx"), str(neu_subset / "scratches"), "--out", str(tmp_path / "o.csv")]) == 0
    by_torch = {row["path"]: float(row["score"]) for row in csv.DictReader((tmp_path / "p.csv").open())}
    by_onnx = {row["path"]: float(row["score"]) for row in csv.DictReader((tmp_path / "o.csv").open())}
    assert by_torch.keys() == by_onnx.keys() and len(by_torch) == 16
    assert max(abs(by_torch[k] - by_onnx[k]) for k in by_torch) < 1e-4
    plain = tmp_path / "plain"
    shutil.copytree(trained_run, plain)
    assert main(["predict", str(plain), str(neu_subset / "scratches"), "--out", str(tmp_path / "n.csv")]) == 0
    by_plain = {row["path"]: float(row["score"]) for row in csv.DictReader((tmp_path / "n.csv").open())}
    if yaml.safe_load((trained_run / "config.yaml").read_text())["eval"]["tta"] == "none":
        assert max(abs(by_torch[k] - by_plain[k]) for k in by_torch) > 1e-4  # the views change the scores
