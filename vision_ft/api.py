"""The public Python API: train a run, open a run folder, and use it.

`vision_ft.train(...)` and `vision_ft.load_run(...)` are the functions here. The `vision-ft`
commands call exactly these with the same arguments (resume included), so a script and the
command line cannot drift apart. Importing this module does not import torch: a run's config
and metrics are plain files; torch loads when a model is built.

    run = vision_ft.train(data="defects/", model="resnet18", out="runs/a", train={"epochs": 3})
    run.metrics["test"]["macro_f1"]
    run.predict(["part1.png", array])  # paths, numpy arrays or Pillow images
    run.export("model.onnx", int8=True)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from vision_ft.config import Config, build_config, flatten_settings, load_config, validate_config
from vision_ft.errors import VisionFTError
from vision_ft.run_folder import RunFolder, next_run_path, open_run_folder

if TYPE_CHECKING:  # torch-side types, for annotations only
    import numpy as np
    from PIL import Image
    from torch import nn

    from vision_ft.callbacks import TrainingCallback
    from vision_ft.export import ExportResult
    from vision_ft.quantize import QuantizeResult
    from vision_ft.run_model import LoadedRun
    from vision_ft.runtime import Prediction
    from vision_ft.train import TrainResult

log = logging.getLogger("vision_ft")

PathLike = Union[str, Path]
ImageInput = Union[str, Path, "np.ndarray", "Image.Image"]


# ---------------------------------------------------------------- resolving a config


def _config_settings(config: PathLike | Config | Mapping[str, Any] | None) -> tuple[Path | None, dict[str, Any]]:
    """A recipe given as a YAML path, a Config or a dict: (yaml path, dotted settings)."""
    if config is None or isinstance(config, (str, Path)):
        return (Path(config) if config is not None else None), {}
    if isinstance(config, Config):
        return None, flatten_settings(config.model_dump(mode="json"))
    if isinstance(config, Mapping):
        return None, flatten_settings(config)
    raise VisionFTError(f"config={config!r} is not a recipe; pass a YAML file path, a dict or a vision_ft Config")


def resolve_config(
    data: PathLike | None = None,
    model: str | None = None,
    config: PathLike | Config | Mapping[str, Any] | None = None,
    weights: str | None = None,
    skip_bad_images: bool = False,
    **overrides: Any,
) -> Config:
    """The Config `train` would run: defaults < recipe < overrides < data/model/weights.

    Overrides are dotted names (`**{"train.epochs": 3}`) or nested dicts (`train={"epochs": 3}`),
    validated exactly like `--set`. Raises VisionFTError naming the first bad key or value.
    """
    yaml_path, settings = _config_settings(config)
    settings.update(flatten_settings(overrides))
    return build_config(yaml_path, settings=settings, data_path=str(data) if data is not None else None,
                        model_name=model, model_weights=weights,
                        data_skip_bad_images=True if skip_bad_images else None)


def resume_config(out: PathLike | None, force: bool = False, given: Sequence[str] = (), **overrides: Any) -> Config:
    """The saved config of run folder `out`, to continue it; only train.epochs may change.

    `given` names the arguments that would start a different run (data, model, config, weights);
    any of them is refused, as is every override but train.epochs.
    """
    if out is None:
        raise VisionFTError("--resume needs --out RUN, the run folder to continue")
    if force:
        raise VisionFTError("--resume and --force contradict each other; --resume continues RUN, --force replaces it")
    saved = load_config(open_run_folder(Path(out)).config).model_dump(mode="json")
    for name, value in flatten_settings(overrides).items():
        if name != "train.epochs":
            raise VisionFTError(f"--resume continues with the run's saved config; only train.epochs may change, "
                                f"not '{name}={value}'")
        saved["train"]["epochs"] = value
    if given:
        flags = "/".join(f"--{name}" for name in given)
        raise VisionFTError(f"--resume continues with the run's saved config; drop {flags}")
    return validate_config(saved, str(out))


def _section_or_value(name: str, value: Any, overrides: dict[str, Any]) -> Any:
    """`model=` and `data=` take a name/path or, like every section, a dict of settings."""
    if isinstance(value, Mapping):
        overrides[name] = dict(value)
        return None
    return value


# ---------------------------------------------------------------- train


def train(
    data: PathLike | Mapping[str, Any] | None = None,
    model: str | Mapping[str, Any] | None = None,
    out: PathLike | None = None,
    config: PathLike | Config | Mapping[str, Any] | None = None,
    resume: bool = False,
    *,
    weights: str | None = None,
    force: bool = False,
    skip_bad_images: bool = False,
    callbacks: Sequence[TrainingCallback] = (),
    **overrides: Any,
) -> Run:
    """Fine-tune a backbone and return the finished run (the same as `vision-ft train`).

    Args:
        data: folder of class folders, pre-split folder or CSV manifest (`--data`).
        model: any timm model name (`--model`).
        out: the run folder (default `runs/<data>-<model>-<n>`).
        config: a YAML recipe path, a dict or a Config (`--config`).
        resume: continue `out` from its last checkpoint; only `train.epochs` may change.
        weights: 'hub', 'none' or a weights file (`--weights`).
        force: replace an existing run folder at `out`.
        skip_bad_images: leave out unreadable images with a warning.
        callbacks: `vision_ft.callbacks.TrainingCallback`s called at each epoch's end.
        **overrides: config keys as dotted names or nested dicts, e.g. `train={"epochs": 3}`.

    Raises:
        VisionFTError: one line naming the bad input and the fix; nothing the user had is changed.
    """
    overrides = dict(overrides)
    data = _section_or_value("data", data, overrides)
    model = _section_or_value("model", model, overrides)
    if resume:
        given = [name for name, value in (("config", config), ("data", data), ("model", model), ("weights", weights))
                 if value is not None]
        cfg = resume_config(out, force, given, **overrides)
    else:
        cfg = resolve_config(data, model, config, weights, skip_bad_images, **overrides)
        if out is None:
            if not cfg.data.path:
                raise VisionFTError("no data given; pass --data DIR (a folder of class folders, or a CSV manifest)")
            out = next_run_path(Path("runs"), cfg.model.name, Path(cfg.data.path))
    from vision_ft.experiment_log import check_mlflow
    from vision_ft.train import train as run_training

    check_mlflow(cfg)
    result = run_training(cfg, Path(out), force=force, resume=resume, callbacks=callbacks)
    return Run(result.run_dir, result)


def load_run(path: PathLike) -> Run:
    """Open a run folder written by `train` (or `vision-ft train`)."""
    return Run(path)


# ---------------------------------------------------------------- a run


@dataclass
class ExportedModel:
    """What `Run.export` wrote: the verified fp32 ONNX model and, with int8, the INT8 model."""

    onnx: ExportResult
    int8: QuantizeResult | None = None

    @property
    def path(self) -> Path:
        return self.onnx.path


class Run:
    """A run folder and what it holds. Config, metrics and history read plain files; `model`,
    `evaluate`, `predict` and `export` load torch when first used."""

    def __init__(self, path: PathLike, result: TrainResult | None = None) -> None:
        self.folder: RunFolder = open_run_folder(Path(path))
        self.result = result  # best epoch, epochs run, early stop: set when this process trained it
        self._loaded: LoadedRun | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def path(self) -> Path:
        return self.folder.root

    @property
    def config(self) -> Config:
        """The fully resolved config the run was trained with."""
        return load_config(self.folder.config)

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json: {"val": {...}, "test": {...}, "best_epoch": n}; {} until training has finished."""
        if not self.folder.metrics.is_file():
            return {}
        return json.loads(self.folder.metrics.read_text())

    @property
    def history(self) -> list[dict[str, Any]]:
        """metrics.jsonl: one dict per epoch (train_loss, val_* metrics, lr, seconds)."""
        if not self.folder.metrics_log.is_file():
            return []
        return [json.loads(line) for line in self.folder.metrics_log.read_text().splitlines() if line.strip()]

    @property
    def class_names(self) -> list[str]:
        from vision_ft.data.split import load_split

        return load_split(self.folder.split)[0]

    def _load(self) -> LoadedRun:
        if self._loaded is None:
            from vision_ft.run_model import default_device
            from vision_ft.run_model import load_run as load_checkpoint

            self._loaded = load_checkpoint(self.path, "best", default_device())
        return self._loaded

    @property
    def task(self) -> Any:
        """The run's `vision_ft.tasks` Task (classification, multilabel or regression) with its
        thresholds or target statistics (built on first use)."""
        return self._load().task

    @property
    def model(self) -> nn.Module:
        """The torch model with the best checkpoint's weights, in eval mode (built on first use)."""
        return self._load().model

    def evaluate(self, data: PathLike, split: str | None = None, checkpoint: str = "best",
                 skip_bad_images: bool = False) -> dict[str, Any]:
        """Metrics of the `best` or `last` checkpoint on every image under `data` (or one split of a
        pre-split folder): accuracy, balanced_accuracy, macro_f1, auroc, per_class, confusion_matrix."""
        from vision_ft.evaluate import evaluate_run

        if checkpoint not in ("best", "last"):
            raise VisionFTError(f"checkpoint must be 'best' or 'last', not '{checkpoint}'")
        if self.config.task == "anomaly":  # image-level anomaly metrics: auroc, f1, recall per defect class
            from vision_ft.anomaly.eval_run import evaluate_anomaly_run

            return evaluate_anomaly_run(self.path, Path(data), split=split, skip_bad_images=skip_bad_images)
        return evaluate_run(self.path, Path(data), split=split, checkpoint=checkpoint, skip_bad_images=skip_bad_images)

    def predict_proba(self, images: PathLike | Sequence[ImageInput], batch_size: int | None = None) -> np.ndarray:
        """Scores (N x outputs, in `class_names` order) of the best checkpoint: class probabilities;
        for a multi-label run per-label probabilities, for a regression run values in the targets' units.

        `images` is an image file, a folder of images (sorted), or a list of paths, numpy arrays
        (H x W or H x W x C) and Pillow images; they are decoded and resized as in training.
        """
        from vision_ft.run_predict import predict_probabilities

        return predict_probabilities(self._load(), images, batch_size)

    def predict(self, images: PathLike | Sequence[ImageInput], threshold: float | None = None,
                batch_size: int | None = None) -> list[Prediction]:
        """A `vision_ft.runtime.Prediction` (label, score, top_class, probabilities) per image; below
        `threshold` the label is 'uncertain', as in the ONNX runtime. Multi-label runs fill
        `labels` (the set above the per-label thresholds), regression runs `values`."""
        from vision_ft.evaluation.run_evaluation import load_decision_rule
        from vision_ft.runtime import predictions

        task = self.task
        if task.kind != "classification":
            return predictions(self.predict_proba(images, batch_size), self.class_names, threshold, task=task.kind,
                               thresholds=task.metadata().get("thresholds"))
        rule = load_decision_rule(self.path, self.class_names)  # operating thresholds chosen on val
        return predictions(self.predict_proba(images, batch_size), self.class_names, threshold, rule)

    def export(
        self,
        path: PathLike | None = None,
        int8: bool = False,
        force: bool = False,
        tolerance: float | None = None,
        calibration_images: int = 128,
        echo: Callable[[str], None] | None = None,
    ) -> ExportedModel:
        """Write the best checkpoint as a verified ONNX model (default RUN/model.onnx, LoRA merged);
        with `int8` also a static INT8 model beside it (`<path>.int8.onnx`), measured on the test split."""
        from vision_ft.export import TOLERANCE, export_run
        from vision_ft.quantize import check_destination, int8_path, quantize_run

        echo = echo or log.info
        out = Path(path) if path is not None else None
        if int8:  # refuse before the slow export, not after it
            check_destination(int8_path(out or self.folder.onnx), force)
        exported = export_run(self.path, out, force=force, tolerance=TOLERANCE if tolerance is None else tolerance,
                              echo=echo)
        quantized = None
        if int8:
            quantized = quantize_run(self.path, source=exported.path, out=int8_path(exported.path), force=force,
                                     calibration_count=calibration_images, echo=echo)
        return ExportedModel(exported, quantized)
