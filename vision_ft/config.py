"""Typed run configuration: defaults, YAML recipes, dotted command-line overrides, validation.

Resolution order (later wins): the defaults below, a YAML recipe (`--config`), `--set a.b=value`
overrides, then the dedicated CLI flags (`--data`, `--model`, `--weights`). Every key is
validated by pydantic; unknown keys and bad values become one-line `VisionFTError`s that name
the key, what is allowed, and a close match when there is one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator,
                      model_validator)

from vision_ft.errors import VisionFTError
from vision_ft.safe_yaml import load_yaml, short_repr


def _int_or_auto(minimum: int, maximum: int | None = None) -> Any:
    """A setting that is a whole number in [minimum, maximum], or "auto" (decided from the data)."""

    def check(value: Any) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"must be 'auto' or a whole number >= {minimum}")
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be 'auto' or between {minimum} and {maximum if maximum is not None else 'any'}")
        return int(value)

    return Annotated[int | str, PlainValidator(check), PlainSerializer(lambda v: v)]


def _float_or_auto(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError("must be 'auto' or a number > 0")
    return float(value)


class _Strict(BaseModel):
    # extra="forbid" turns a typo such as `train.epohcs` into an error instead of a silent no-op.
    # allow_inf_nan=False: `train.lr=.inf` or `data.mean=[.nan]` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _default_train_augment() -> list[dict[str, Any]]:
    # Mild, label-preserving augmentations that suit inspection and medical images alike:
    # defects and lesions keep their meaning under flips and small rotations.
    return [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "Affine", "rotate": [-10, 10], "translate_percent": [-0.05, 0.05], "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
    ]


class AugmentConfig(_Strict):
    train: list[dict[str, Any]] = Field(default_factory=_default_train_augment)


class DataConfig(_Strict):
    path: str | None = None
    # auto: from the images' native sizes, clamped and rounded for the backbone (vision_ft/auto_size.py)
    image_size: _int_or_auto(16, 4096) = "auto"
    channels: Literal[1, 3] = 3
    mean: list[float] | None = None
    std: list[float] | None = None
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    split_seed: int = 0
    workers: int = Field(2, ge=0)
    skip_bad_images: bool = False
    # Images with more pixels are refused (JPEGs are decoded at a reduced scale first): bounded
    # memory on hostile files. See vision_ft.data.decode.MAX_PIXELS.
    max_pixels: int = Field(40_000_000, ge=1024)
    # How to counter class imbalance: weight the loss by inverse class frequency, or draw
    # batches with a class-balanced sampler; auto weights the loss when the smallest class has
    # under a third of the largest one's images (vision_ft/imbalance.py).
    balance: Literal["auto", "none", "loss_weights", "sampler"] = "auto"
    # How images with more than 8 bits (16-bit PNG/TIFF, float TIFF, DICOM) become 8-bit pixels:
    # auto | minmax | percentile[lo,hi] | window[center,width] (vision_ft.data.intensity).
    intensity: str = "auto"
    # DICOM VOI window: file (the file's own, else `intensity`) | auto (`intensity`) | [center, width].
    dicom_window: Union[Literal["file", "auto"], list[float]] = "file"
    dicom_frame: int | None = Field(None, ge=0)  # the frame of multi-frame DICOM files; null refuses them
    # task: multilabel reads 0/1 columns with these names instead of a `labels` column.
    label_columns: list[str] | None = None
    # task: regression reads these numeric columns instead of the `target` column.
    target_columns: list[str] | None = None
    # A CSV column or a regex with (?P<group>...) over the relative path: images of one group
    # (patient) never share a split; see vision_ft.data.groups.
    group_by: str | None = None
    allow_group_leak: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("intensity")
    @classmethod
    def _known_intensity(cls, value: str) -> str:
        from vision_ft.data.intensity import parse_intensity

        try:
            return parse_intensity(value).spec
        except VisionFTError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("dicom_window")
    @classmethod
    def _center_and_width(cls, value: Any) -> Any:
        if isinstance(value, list) and (len(value) != 2 or value[1] < 1):
            raise ValueError("needs [center, width] with width >= 1, e.g. [40, 400]")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _one_or_three_values(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) not in (1, 3):
            raise ValueError(f"needs 1 or 3 values, got {len(value)}")
        return value


class ModelConfig(_Strict):
    name: str = "resnet18"
    # "hub" downloads timm's pretrained weights, "none" starts from random weights,
    # anything else is a path to a .safetensors/.pth/.bin state_dict.
    weights: str = "hub"
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class EarlyStoppingConfig(_Strict):
    # auto: the task's (classification: AUROC for two classes, the loss otherwise, smooth metrics
    # a small val split cannot fool; multilabel: macro_auroc; regression: rmse).
    metric: Literal["auto", "loss", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "macro_auroc", "map",
                    "micro_auroc", "micro_f1", "rmse", "mae", "r2", "pearson", "spearman"] = "auto"
    patience: _int_or_auto(1) = "auto"


class TrainConfig(_Strict):
    epochs: _int_or_auto(1) = "auto"
    # e.g. "10m", "90s", "1h30m": epochs are planned to fill it, evaluation and export included
    time_budget: str | None = None
    # 16: on a 2-core CPU a batch of 16 trains each image 1.45x faster than a batch of 32
    # (EfficientNet-Lite0 at 224 px: 0.49 s against 1.42 s a step in `vision-ft train`), since its
    # activations stay in the caches; small inspection and medical datasets gain steps, not lose them.
    batch_size: int = Field(16, ge=1)
    lr: Annotated[float | str, PlainValidator(_float_or_auto), PlainSerializer(lambda v: v)] = "auto"
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    # auto: bf16 autocast on GPUs that support it, fp16 + loss scaling on older GPUs; on a CPU with
    # bfloat16 instructions and a time budget, bf16 when a timed step is 1.2x faster (ResNets, ViTs), else
    # off (depthwise-heavy EfficientNets; CPUs without them). vision_ft/precision.py
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # Layout of the model's weights and activations. auto: channels_last on CPU (1.1-1.5x faster
    # steps for CNNs, LoRA runs included: benchmarks/memory_format.py), contiguous (NCHW) on CUDA.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    seed: int = 0
    # Keep an exponential moving average of the weights; it is evaluated each epoch and kept when better.
    ema: bool = True
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    regression_loss: Literal["mse", "l1", "huber"] = "mse"  # on standardised targets
    # multilabel: BCE positive weights, none | auto (negatives/positives per label, capped at 100) | one per label
    pos_weight: Union[Literal["none", "auto"], list[float]] = "none"

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off_in_yaml(cls, value: object) -> object:
        # YAML reads a bare `off` (amp: off, --set train.amp=off) as false.
        return "off" if value is False else value

    @field_validator("time_budget")
    @classmethod
    def _readable_budget(cls, value: str | None) -> str | None:
        if value is not None:
            from vision_ft.budget import parse_duration

            parse_duration(value)  # raises ValueError with the accepted forms
        return value


class LoRAConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False
    # fnmatch patterns on module names; null picks every conv and linear layer but the head.
    targets: list[str] | None = None
    train_norm: bool = False
    backend: Literal["auto", "torch", "triton"] = "auto"


class FinetuneConfig(_Strict):
    strategy: Literal["full", "linear_probe", "partial", "progressive", "lora"] = "full"
    # partial: how many layer groups, counted from the stem, stay frozen; progressive: how many never unfreeze.
    freeze_groups: int = Field(0, ge=0)
    # progressive: unfreeze one more group (top-down) every N epochs, or at these epochs.
    unfreeze_every: int | None = Field(2, ge=1)
    unfreeze_at: list[int] | None = None
    # Layer-wise learning-rate decay: group k below the head trains at lr * lr_decay**k.
    lr_decay: float = Field(1.0, gt=0, le=1)
    # Warmup, in epochs, for a group that joins the optimizer mid-run.
    group_warmup_epochs: float = Field(0.5, ge=0)
    # Frozen groups keep BatchNorm running statistics fixed ("freeze") or keep updating them ("train").
    frozen_bn: Literal["freeze", "train"] = "freeze"
    lora: LoRAConfig = Field(default_factory=LoRAConfig)


class ExportConfig(_Strict):
    # Write RUN/model.onnx (LoRA merged, checked against onnxruntime) when training ends.
    onnx: bool = True
    # CNN classifiers with a pooling + linear head also output class activation maps ('cam').
    cam: bool = True


class AnomalyConfig(_Strict):
    """`task: anomaly`: a PatchCore-style model fitted on good parts only (vision_ft.anomaly)."""

    good_class: str = Field("good", min_length=1)
    # Backbone feature levels (timm feature_info indices); null: the levels at strides 8 and 16.
    layers: list[int] | None = None
    patch_size: int = Field(3, ge=1)
    feature_dim: int = Field(384, ge=8)
    coreset_fraction: float = Field(0.1, gt=0, le=1)
    max_patches: int = Field(60000, ge=100)
    projection_dim: int = Field(128, ge=0)
    neighbours: int = Field(9, ge=1)
    blur_sigma: float = Field(4.0, ge=0)
    threshold_rule: Literal["best_f1", "target_recall"] = "best_f1"
    target_recall: float = Field(0.95, gt=0, le=1)
    good_quantile: float = Field(0.99, gt=0, lt=1)
    uncertain_band: float = Field(0.05, ge=0, lt=0.5)


class CalibrationConfig(_Strict):
    # auto: fit a temperature on the validation logits, keep it unless it raises validation NLL.
    temperature: Literal["auto", "none"] | float = "auto"

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: str | float) -> str | float:
        if isinstance(value, float) and not value > 0:
            raise ValueError("a temperature must be positive (or auto, or none)")
        return value


class EvalConfig(_Strict):
    # Binary tasks: the class that counts as positive (sensitivity = its recall).
    positive_class: str | None = None
    target_sensitivity: float | None = Field(None, gt=0, le=1)
    target_specificity: float | None = Field(None, gt=0, le=1)
    # Multi-class: {class: recall} thresholds chosen on validation; images below them are uncertain.
    target_recall: dict[str, float] | None = None
    bootstrap_resamples: int = Field(2000, ge=0)  # 0: no confidence intervals
    confidence: float = Field(0.95, gt=0, lt=1)
    # Test-time augmentation of the final val/test evaluation, eval and predict (vision_ft.tta):
    # flip | vflip | flip_hv average the logits of each image and its mirrors; auto: the mirrors
    # the training augmentation applies, kept when they improve the validation selection metric.
    tta: Literal["auto", "none", "flip", "vflip", "flip_hv"] = "auto"

    @field_validator("target_recall")
    @classmethod
    def _recalls(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for name, recall in (value or {}).items():
            if not 0 < recall <= 1:
                raise ValueError(f"recall {recall} for {name!r} must be in (0, 1]")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "EvalConfig":
        if self.target_sensitivity is not None and self.target_specificity is not None:
            raise ValueError("set eval.target_sensitivity or eval.target_specificity, not both")
        return self


class LoggingConfig(_Strict):
    # TensorBoard event files in the run folder (scalars per epoch, lr per group, confusion matrices).
    tensorboard: bool = True
    # MLflow (pip install 'vision-ft[mlflow]'): params, metrics and artifacts, to ./mlruns unless a URI is given.
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "vision-ft"


class TuneConfig(_Strict):
    # `vision-ft tune`: {dotted config key: {log_uniform: [low, high]} | {uniform: [low, high]} |
    # {int: [low, high]} | {choice: [a, b, ...]}}, checked by vision_ft.tune.space.
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # What the search maximises (minimises for loss) on the validation split; null: train.early_stopping.metric.
    metric: Literal["loss", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "macro_auroc", "map", "micro_auroc",
                    "micro_f1", "rmse", "mae", "r2", "pearson", "spearman"] | None = None
    trials: int | None = Field(None, ge=1)  # total trials in the study (resumed searches count earlier ones)
    timeout: float | None = Field(None, gt=0)  # seconds for this invocation
    # Random trials before TPE models the space and before the median pruner compares a trial
    # with earlier ones; the pruner also waits warmup_epochs: too early a comparison kills slow starters.
    startup_trials: int = Field(3, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    # null: score a trial on the validation split; k: by the mean test metric of a k-fold
    # cross-validation of its settings (vision_ft.cv), pruned between folds instead of epochs.
    folds: int | None = Field(None, ge=2)


class Config(_Strict):
    task: Literal["classification", "multilabel", "regression", "anomaly"] = "classification"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


def _allowed_keys(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for listing allowed keys)."""
    current: type[BaseModel] = Config
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        current = annotation
    return current


def _explain(error: ValidationError, origin: str) -> VisionFTError:
    """Turn pydantic's multi-line report into one line about the first problem."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    others = error.error_count() - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = _allowed_keys(owner) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'? " if close else ""
        return VisionFTError(
            f"{origin}: unknown config key '{key}'; {hint}allowed here: {', '.join(allowed)}{more}"
        )
    value = first.get("input")
    return VisionFTError(f"{origin}: bad value {short_repr(value)} for '{key}': {first['msg'][:200]}{more}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.epochs=6` into (["train", "epochs"], 6); the value is read as YAML."""
    if "=" not in text:
        raise VisionFTError(f"override '{text}' needs the form key.path=value, e.g. train.epochs=6")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise VisionFTError(f"override '{text}' has an empty key; use e.g. train.epochs=6")
    try:
        value = load_yaml(raw, f"override '{short_repr(text)}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_nested(tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VisionFTError(f"override '{text}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


MAX_RECIPE_BYTES = 1_000_000  # the default recipe is 2 KB


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML recipe as a dict, with one-line errors for missing or malformed files."""
    if not path.is_file():
        raise VisionFTError(f"config file {path} does not exist; pass an existing YAML file to --config")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise VisionFTError(f"config file {path} has {path.stat().st_size} bytes, too many for a recipe "
                            f"(at most {MAX_RECIPE_BYTES}); pass the YAML recipe itself")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
    except UnicodeDecodeError:
        raise VisionFTError(f"config file {path} is not UTF-8 text; pass a YAML recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise VisionFTError(f"config file {path} is not valid YAML{where}; fix the syntax there") from None
    if not isinstance(loaded, dict):
        raise VisionFTError(f"config file {path} must hold a mapping of sections (data:, model:, train:, finetune:)")
    return loaded


def _is_section(dotted: str) -> bool:
    """Whether a dotted key names a section (a nested model) rather than a value; unknown keys
    count as sections so that validation names the exact unknown key inside them."""
    current: type[BaseModel] = Config
    for part in dotted.split("."):
        field = current.model_fields.get(part)
        if field is None:
            return True
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        current = annotation
    return True


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Python keyword overrides as dotted keys: {"train": {"epochs": 3}} -> {"train.epochs": 3}.

    Dotted names pass through ({"train.epochs": 3}); both forms may be mixed. Dict-valued keys
    (tune.space, eval.target_recall) stay whole.
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and _is_section(name):
            flat.update(flatten_settings(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def build_config(
    yaml_path: Path | None = None,
    overrides: list[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    **flags: Any,
) -> Config:
    """Resolve a Config from defaults, a YAML recipe, dotted overrides and CLI flags.

    `overrides` are `--set` texts ("train.epochs=6", the value read as YAML); `settings` are the
    same overrides with Python values ({"train.epochs": 6} or {"train": {"epochs": 6}}), applied
    after them through the same path. `flags` take dotted keys with underscores for dots, e.g.
    `data_path="defects/"`; a None value means "flag not given".
    """
    tree: dict[str, Any] = read_yaml(yaml_path) if yaml_path else {}
    origin = str(yaml_path) if yaml_path else "config"
    for text in overrides or []:
        parts, value = parse_override(text)
        _set_nested(tree, parts, value, text)
    for name, value in flatten_settings(settings or {}).items():
        parts = [p for p in name.split(".") if p]
        if not parts:
            raise VisionFTError(f"override '{name}={short_repr(value)}' has an empty key; use e.g. train.epochs=6")
        _set_nested(tree, parts, value, f"{name}={short_repr(value)}")
    for name, value in flags.items():
        if value is not None:
            section, key = name.split("_", 1)
            _set_nested(tree, [section, key], value, name)
    return validate_config(tree, origin)


def validate_config(tree: dict[str, Any], origin: str = "config") -> Config:
    """Validate a plain dict as a Config, raising a one-line VisionFTError on the first problem."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, origin) from None


def save_config(config: Config, path: Path) -> None:
    """Write the fully resolved config, every key included, so a run can be reproduced from it."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def load_config(path: Path) -> Config:
    """Load a resolved config saved in a run folder."""
    return validate_config(read_yaml(path), str(path))
