"""Experiment logs that users' own tools read: TensorBoard event files in every run folder, and
MLflow when `logging.mlflow: true`.

Both are training callbacks (`vision_ft.callbacks`), written offline: TensorBoard files sit next
to metrics.jsonl (`tensorboard --logdir runs/` shows every run), MLflow goes to a local
`mlruns/` (SQLite database + artifacts) unless `logging.mlflow_tracking_uri` names a server.
Nothing is sent anywhere unless the user asks for it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vision_ft.callbacks import TrainingCallback
from vision_ft.config import Config, flatten_settings
from vision_ft.errors import VisionFTError
from vision_ft.run_folder import RunFolder

log = logging.getLogger("vision_ft")

MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run a resumed training continues
PARAM_LIMIT = 500  # characters per MLflow parameter value (long augment lists are cut)


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row, as TensorBoard/MLflow names ('val_accuracy' -> 'val/accuracy')."""
    named = {}
    for key, value in row.items():
        if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        section, _, metric = key.partition("_")
        name = f"{section}/{metric}" if section in ("train", "val", "test") and metric else f"epoch/{key}"
        named[name] = float(value)
    return named


def _final_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """{'test/accuracy': ..., 'val/macro_f1': ...} from metrics.json (the best checkpoint's scores)."""
    named = {}
    for split in ("val", "test"):
        for key, value in (metrics.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                named[f"{split}/{key}"] = float(value)
    return named


class TensorBoardLog(TrainingCallback):
    """Scalars per epoch (losses, validation metrics, each layer group's learning rate), the best
    checkpoint's final scores and its confusion matrices as images."""

    def __init__(self, run: RunFolder, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.writer = SummaryWriter(log_dir=str(run.root))
        self.writer.add_text("config", f"```yaml\n{run.config.read_text()}\n```", 0)

    def on_epoch_end(self, epoch: int, row: dict[str, Any], learning_rates: dict[str, float]) -> None:
        for name, value in _numbers(row).items():
            self.writer.add_scalar(name, value, epoch)
        for group, rate in learning_rates.items():
            self.writer.add_scalar(f"lr/{group}", rate, epoch)
        self.writer.flush()  # a run interrupted later still shows every finished epoch

    def on_train_end(self, metrics: dict[str, Any]) -> None:
        best = int(metrics.get("best_epoch", 0))
        for name, value in _final_numbers(metrics).items():
            self.writer.add_scalar(f"best/{name}", value, best)
        for split in ("val", "test"):
            image = self.run.plots / f"confusion_{split}.png"
            if image.is_file():
                pixels = np.asarray(Image.open(image).convert("RGB"))
                self.writer.add_image(f"confusion_matrix/{split}", pixels, best, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_mlflow(config: Config) -> None:
    """Refuse `logging.mlflow: true` without MLflow installed, before any file is written."""
    if config.logging.mlflow and importlib.util.find_spec("mlflow") is None:
        raise VisionFTError("logging.mlflow is true but MLflow is not installed; pip install 'vision-ft[mlflow]' "
                            "or set logging.mlflow=false")


def default_tracking_uri() -> str:
    """A local SQLite store in ./mlruns (MLflow 3 no longer writes its plain-file store)."""
    folder = Path("mlruns").resolve()
    folder.mkdir(exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database (MLflow's own default is ./mlruns
    in whatever folder the process runs in); a server keeps its own artifact root (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()


def mlflow_name(name: str) -> str:
    """'lr/conv1+bn1' -> 'lr_conv1_bn1': MLflow metric names allow letters, digits and _ - . : / and
    spaces; layer-group names join modules with '+'."""
    return re.sub(r"[^A-Za-z0-9_\-. :]", "_", name.replace("/", "_"))


class MLflowLog(TrainingCallback):
    """Params (the resolved config), per-epoch metrics and, at the end, the run folder's files."""

    def __init__(self, run: RunFolder, config: Config) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.run = run
        self.finished = False
        record = run.root / MLFLOW_RUN_FILE
        if record.is_file():  # a resumed training continues its MLflow run
            saved = json.loads(record.read_text())
            self.client = MlflowClient(tracking_uri=saved["tracking_uri"])
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        uri = config.logging.mlflow_tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.logging.mlflow_experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = local_artifact_root(uri)
            experiment_id = self.client.create_experiment(config.logging.mlflow_experiment, artifact_location=artifacts)
        created = self.client.create_run(experiment_id, run_name=run.root.name,
                                         tags={"vision_ft.run_folder": str(run.root.resolve())})
        self.run_id = created.info.run_id
        params = [Param(key, str(value)[:PARAM_LIMIT])
                  for key, value in flatten_settings(config.model_dump(mode="json")).items()]
        self.client.log_batch(self.run_id, params=params)
        record.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))
        log.info("MLflow run %s in %s", self.run_id, uri)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(name), value, now, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_epoch_end(self, epoch: int, row: dict[str, Any], learning_rates: dict[str, float]) -> None:
        self._log({**_numbers(row), **{f"lr/{group}": rate for group, rate in learning_rates.items()}}, epoch)

    def on_train_end(self, metrics: dict[str, Any]) -> None:
        self._log({f"best/{name}": value for name, value in _final_numbers(metrics).items()},
                  int(metrics.get("best_epoch", 0)))
        for name in ("config.yaml", "split.json", "metrics.json", "metrics.jsonl", "report.md", "model.onnx"):
            if (self.run.root / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run.root / name))
        if self.run.plots.is_dir():
            self.client.log_artifacts(self.run_id, str(self.run.plots), "plots")
        self.finished = True

    def close(self) -> None:
        # An interrupted or failed training is resumable: KILLED, not FAILED, unless it finished.
        self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "KILLED")


def open_experiment_logs(run: RunFolder, config: Config, is_main: bool) -> list[TrainingCallback]:
    """The logs `config.logging` asks for (on the main process); TensorBoard is skipped with a
    one-line note when the tensorboard package is missing."""
    if not is_main:
        return []
    logs: list[TrainingCallback] = []
    if config.logging.tensorboard:
        if importlib.util.find_spec("tensorboard") is None:
            log.warning("no TensorBoard log: the tensorboard package is not installed (pip install tensorboard)")
        else:
            logs.append(TensorBoardLog(run, config))
    if config.logging.mlflow:
        check_mlflow(config)
        logs.append(MLflowLog(run, config))
    return logs
