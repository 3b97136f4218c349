"""The public Python API: lazy imports, overrides validated like --set, resume from Python,
and run folders identical to the command line's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import load_file

import vision_ft
from tests.real_data import copy_neu_subset, needs_neu
from vision_ft.api import resolve_config
from vision_ft.cli import main
from vision_ft.config import build_config
from vision_ft.errors import VisionFTError


def test_importing_the_package_and_runtime_does_not_import_torch():
    code = ("import sys, vision_ft, vision_ft.runtime; vision_ft.load_run; vision_ft.Run; "
            "assert callable(vision_ft.train); "
            "print(sorted(m for m in ('torch', 'timm', 'albumentations') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_train_stays_the_function_after_the_loop_module_is_imported():
    from vision_ft.train import train as loop_train

    assert vision_ft.train is not loop_train
    assert vision_ft.train.__module__ == "vision_ft.api"
    assert sys.modules["vision_ft.train"].train is loop_train


def test_cross_validate_is_public():
    from vision_ft.cv import cross_validate

    assert vision_ft.cross_validate is cross_validate


def test_dotted_and_nested_overrides_resolve_like_set():
    by_set = build_config(None, ["train.epochs=3", "train.early_stopping.patience=2", "finetune.strategy=lora"])
    dotted = resolve_config(**{"train.epochs": 3, "train.early_stopping.patience": 2, "finetune.strategy": "lora"})
    nested = resolve_config(train={"epochs": 3, "early_stopping": {"patience": 2}}, finetune={"strategy": "lora"})
    mixed = resolve_config(train={"epochs": 3}, **{"train.early_stopping.patience": 2, "finetune.strategy": "lora"})
    assert by_set == dotted == nested == mixed
    assert nested.train.epochs == 3 and nested.finetune.strategy == "lora"


def test_recipe_as_path_dict_or_config(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"lr": 1e-4}, "data": {"image_size": 64}}))
    from_file = resolve_config(config=recipe, train={"epochs": 2})
    from_dict = resolve_config(config={"train": {"lr": 1e-4}, "data": {"image_size": 64}}, train={"epochs": 2})
    from_config = resolve_config(config=from_file)
    assert from_file == from_dict == from_config
    assert (from_file.train.lr, from_file.data.image_size, from_file.train.epochs) == (1e-4, 64, 2)


@pytest.mark.parametrize(
    ("kwargs", "set_text", "expected"),
    [
        ({"train.epohcs": 3}, "train.epohcs=3", "unknown config key 'train.epohcs'; did you mean 'train.epochs'"),
        ({"train": {"lr": -1}}, "train.lr=-1", "bad value -1 for 'train.lr'"),
        ({"finetune.strategy": "lorra"}, "finetune.strategy=lorra", "bad value 'lorra' for 'finetune.strategy'"),
        ({"trian": {"epochs": 3}}, "trian.epochs=3", "unknown config key 'trian'"),
        ({"train.epochs.max": 3}, "train.epochs.max=3", "bad value {'max': 3} for 'train.epochs'"),
    ],
)
def test_bad_overrides_fail_like_set(kwargs, set_text, expected):
    with pytest.raises(VisionFTError) as from_python:
        resolve_config(**kwargs)
    with pytest.raises(VisionFTError) as from_set:
        build_config(None, [set_text])
    assert expected in str(from_python.value) and expected in str(from_set.value)
    assert "\n" not in str(from_python.value)


def test_bad_train_arguments_end_in_one_line(tmp_path):
    with pytest.raises(VisionFTError, match="--resume needs --out"):
        vision_ft.train(resume=True)
    with pytest.raises(VisionFTError, match="no data given"):
        vision_ft.train(model="resnet18")
    with pytest.raises(VisionFTError, match="is not a recipe"):
        vision_ft.train(data=tmp_path, config=42)
    with pytest.raises(VisionFTError, match="run folder .* does not exist"):
        vision_ft.train(out=tmp_path / "missing", resume=True)
    with pytest.raises(VisionFTError, match="does not exist"):
        vision_ft.load_run(tmp_path / "missing")


def test_set_naming_a_whole_section_is_refused(capsys):
    assert main(["train", "--set", "train=3"]) == 2
    assert "names a whole section" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end on NEU-DET

CLASSES = ("crazing", "patches", "scratches")
SETTINGS = {"data.image_size": 32, "data.workers": 0, "train.batch_size": 16, "train.epochs": 2,
            "train.warmup_epochs": 0, "export.onnx": False}


@pytest.fixture(scope="module")
def neu_small(tmp_path_factory) -> Path:
    return copy_neu_subset(tmp_path_factory.mktemp("neu"), CLASSES, 12)


@pytest.fixture(scope="module")
def cli_and_api_runs(neu_small, tmp_path_factory) -> tuple[Path, "vision_ft.Run"]:
    root = tmp_path_factory.mktemp("runs")
    # Both runs also log to one local MLflow store (a file in the test's folder, nothing remote).
    tracking = {"logging.mlflow": True, "logging.mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    settings = {**SETTINGS, **tracking}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--data", str(neu_small), "--model", "resnet18", "--weights", "none",
                 "--out", str(root / "cli"), *sets]) == 0
    run = vision_ft.train(data=neu_small, model="resnet18", weights="none", out=root / "api", **settings)
    return root / "cli", run


def _epochs_without_timing(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow
@needs_neu
def test_cli_and_python_api_write_identical_run_folders(cli_and_api_runs):
    cli, run = cli_and_api_runs
    api = run.path
    for name in ("config.yaml", "split.json", "metrics.json"):
        assert (cli / name).read_text() == (api / name).read_text(), name
    assert _epochs_without_timing(cli) == _epochs_without_timing(api)
    for checkpoint in ("best", "last"):
        cli_weights = load_file(cli / "checkpoints" / checkpoint / "model.safetensors")
        api_weights = load_file(api / "checkpoints" / checkpoint / "model.safetensors")
        assert cli_weights.keys() == api_weights.keys()
        for key in cli_weights:
            np.testing.assert_array_equal(cli_weights[key], api_weights[key], err_msg=key)


@pytest.mark.slow
@needs_neu
def test_run_reads_config_metrics_and_predicts_paths_and_arrays(cli_and_api_runs, neu_small):
    _, run = cli_and_api_runs
    assert run.config.data.image_size == 32 and run.class_names == list(CLASSES)
    assert run.metrics["best_epoch"] == run.result.best_epoch
    assert [row["epoch"] for row in run.history] == [1, 2]
    images = sorted((neu_small / "scratches").glob("*.jpg"))[:3]
    from_paths = run.predict_proba(images)
    from_arrays = run.predict_proba([np.asarray(Image.open(p)) for p in images])
    from_folder = run.predict_proba(neu_small / "scratches")
    np.testing.assert_allclose(from_paths, from_arrays, atol=1e-6)
    np.testing.assert_allclose(from_paths, from_folder[:3], atol=1e-6)
    assert from_paths.shape == (3, 3)
    predictions = run.predict(images, threshold=1.0)
    assert [p.label for p in predictions] == ["uncertain"] * 3
    assert [p.top_class for p in predictions] == [CLASSES[int(i)] for i in from_paths.argmax(1)]
    assert sum(1 for _ in run.model.parameters()) > 0
    evaluated = run.evaluate(neu_small)
    assert evaluated["num_samples"] == 3 * 12
    assert sum(map(sum, evaluated["confusion_matrix"])) == 36


@pytest.mark.slow
@needs_neu
def test_resume_from_python_continues_the_run(cli_and_api_runs, tmp_path):
    import shutil

    _, run = cli_and_api_runs
    copy = tmp_path / "resumed"
    shutil.copytree(run.path, copy)
    with pytest.raises(VisionFTError, match="only train.epochs may change"):
        vision_ft.train(out=copy, resume=True, train={"lr": 1e-3})
    with pytest.raises(VisionFTError, match="drop --data"):
        vision_ft.train(out=copy, resume=True, data=tmp_path)
    resumed = vision_ft.train(out=copy, resume=True, train={"epochs": 3})
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.result.epochs_run == 3


# ---------------------------------------------------------------- experiment logs


@pytest.mark.slow
@needs_neu
def test_every_run_writes_tensorboard_scalars_lr_groups_and_confusion_images(cli_and_api_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = cli_and_api_runs
    assert list(run.path.glob("events.out.tfevents.*")), "no TensorBoard event file next to metrics.jsonl"
    events = EventAccumulator(str(run.path)).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/loss", "val/accuracy", "val/macro_f1", "lr/fc", "lr/layer4", "lr/conv1+bn1", "best/test/accuracy"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("val/macro_f1")] == [1, 2]
    logged = [e.value for e in events.Scalars("val/macro_f1")]
    np.testing.assert_allclose(logged, [row["val_macro_f1"] for row in run.history], rtol=1e-6)
    assert {"confusion_matrix/val", "confusion_matrix/test"} <= set(events.Tags()["images"])


@pytest.mark.slow
@needs_neu
def test_mlflow_gets_params_metrics_and_artifacts_locally(cli_and_api_runs):
    from mlflow import MlflowClient

    _, run = cli_and_api_runs
    record = json.loads((run.path / "mlflow_run.json").read_text())
    assert record["tracking_uri"].startswith("sqlite:///")
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    logged = client.get_run(record["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.epochs"] == "2" and logged.data.params["model.name"] == "resnet18"
    # (The resume test continues a copy of this folder, and with it this MLflow run: epoch 3 may follow.)
    steps = [m.step for m in client.get_metric_history(record["run_id"], "val_macro_f1")]
    assert steps[:2] == [1, 2]
    assert len(client.get_metric_history(record["run_id"], "lr_conv1_bn1")) == len(steps)  # 'lr/conv1+bn1', made legal
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.yaml", "metrics.json", "split.json", "plots"} <= artifacts


def test_metrics_rows_become_tensorboard_names_and_lr_groups_collapse():
    from vision_ft.callbacks import group_learning_rates
    from vision_ft.experiment_log import _numbers

    row = {"epoch": 3, "train_loss": 0.5, "val_macro_f1": 0.8, "lr": 1e-4, "seconds": 2.0}
    assert _numbers(row) == {"train/loss": 0.5, "val/macro_f1": 0.8, "epoch/lr": 1e-4, "epoch/seconds": 2.0}
    groups = [{"layer_group": "fc", "lr": 1e-3}, {"layer_group": "fc", "lr": 1e-3}, {"layer_group": "layer4", "lr": 5e-4}]
    assert group_learning_rates(groups) == {"fc": 1e-3, "layer4": 5e-4}


def test_mlflow_missing_is_one_line(monkeypatch):
    import importlib.util as util

    from vision_ft.experiment_log import check_mlflow

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(VisionFTError, match=r"MLflow is not installed; pip install 'vision-ft\[mlflow\]'"):
        check_mlflow(resolve_config(logging={"mlflow": True}))
    check_mlflow(resolve_config())  # not asked for: no error
