"""`vision-ft export RUN`: a verified, self-describing ONNX model of a trained run.

Steps (`export_model`, for a model in memory; `export_run` first rebuilds a run's best
checkpoint): copy the model, merge LoRA adapters into their layers, export
in eval mode with a dynamic batch axis, attach the metadata of `vision_ft.onnx_metadata`, run
`onnx.checker`, then verify onnxruntime against torch on the run's validation images. The file
only appears under its final name after every step passed.

Exporter: the torch.export-based ONNX exporter (``dynamo=True``, torch's default since 2.9) at
opset 20, torch's default opset. Both exporters reproduce resnet18, efficientnet_b0,
tf_efficientnet_lite0, mobilenetv3, convnext_atto, regnetx, densenet121, vit_tiny and deit_tiny
to within 4e-5, but the dynamo graph is the cleaner one: for TF-'same'-padded EfficientNets it
holds 49 Conv + 33 Clip nodes, where the TorchScript exporter (deprecated since torch 2.9) leaves
231 Constant nodes and Shape/Gather/Pad chains that recompute the padding on every call and get
in the way of INT8 fusion. Opset 20 has a native Gelu op: vit_tiny runs about 10% faster in
onnxruntime than with opset 18's Erf decomposition (33 vs 30 images/s, batch 32, 2 threads).
onnxruntime reads opset 20 since 1.17 (vision-ft requires 1.18). The exporter needs `onnxscript`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

import vision_ft
from vision_ft.config import Config
from vision_ft.data.decode import load_image
from vision_ft.data.discover import Sample
from vision_ft.data.pixel_policy import policy_from_config, policy_from_metadata
from vision_ft.data.split import load_split, split_fingerprint
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.evaluation.run_evaluation import load_decision_rule
from vision_ft.finetune.lora import lora_modules, merge_lora
from vision_ft.finetune.norm_folding import unfold_norms
from vision_ft.heatmaps.cam import CAM_OUTPUT
from vision_ft.heatmaps.cam_export import cam_classifier_for, check_cam_export
from vision_ft.onnx_metadata import ModelMetadata, write_metadata
from vision_ft.run_folder import open_run_folder
from vision_ft.run_model import is_anomaly_run, load_run
from vision_ft.runtime import OnnxClassifier, open_session
from vision_ft.tasks.base import Task
from vision_ft.tasks.postprocess import task_summary
from vision_ft.tta import views_of, with_views

OPSET = 20
# Largest |onnxruntime - torch| logit difference accepted for logits up to 10 in size; larger
# logits get a proportional allowance, as fp32 rounding grows with magnitude:
# allowed = TOLERANCE * max(1, max |logit| / 10). Reordered fp32 sums (Conv+BN folding, other
# GEMM blocking) gave 2e-8..4e-5 on the models above; 1e-3 leaves 25x headroom and moves no
# softmax probability by more than 0.002. A real export bug (wrong padding, a train-mode layer,
# a lost adapter) shows up as differences of 1e-2 and more.
TOLERANCE = 1e-3
VERIFY_IMAGES = 16

log = logging.getLogger("vision_ft")


@dataclass(frozen=True)
class Verification:
    """onnxruntime against torch on the same images."""

    images: int
    max_abs_diff: float  # largest |logit difference|
    allowed: float  # the tolerance, scaled to the logits' magnitude
    top1_agreement: float  # fraction of images with the same top-1 class

    def summary(self) -> str:
        agree = round(self.top1_agreement * self.images)
        return (f"max |logit diff| {self.max_abs_diff:.2e} (allowed {self.allowed:.1e}), "
                f"top-1 agreement {agree}/{self.images} ({self.top1_agreement:.0%})")


@dataclass(frozen=True)
class ExportChecks:
    """How an export is made and verified (the `vision-ft export` options)."""

    tolerance: float = TOLERANCE  # largest |onnxruntime - torch| logit difference, see TOLERANCE
    verify_count: int = VERIFY_IMAGES  # validation images compared
    opset: int = OPSET


@dataclass(frozen=True)
class ExportResult:
    path: Path
    verification: Verification
    metadata: ModelMetadata
    seconds: float


def merge_adapters(model: nn.Module) -> nn.Module:
    """`model` with any LoRA adapters merged into plain layers (same outputs, no LoRA modules)."""
    if not any(True for _ in lora_modules(model)):
        return model
    merged = merge_lora(model)
    model = merged if merged is not None else model
    left = [name for name, _ in lora_modules(model)]
    if left:
        raise VisionFTError(f"LoRA layer {left[0]} could not be merged for export; report this with the model name")
    return model


def to_onnx(model: nn.Module, channels: int, input_size: tuple[int, int], opset: int = OPSET,
            output_names: tuple[str, ...] = ("logits",)) -> onnx.ModelProto:
    """Export an eval-mode model to ONNX with input 'image' (N x C x H x W) and outputs named
    `output_names` (a classifier's 'logits', N x classes; see the task's `onnx_output_name`).

    The batch axis is dynamic; the example batch has 2 images because torch.export treats a
    size of 1 as a constant.
    """
    try:
        import onnxscript  # noqa: F401 - the exporter's operator library
    except ImportError:
        raise VisionFTError("ONNX export needs the onnxscript package; install it with `pip install onnxscript`") from None
    model.eval()
    example = torch.randn(2, channels, *input_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter prints progress and warns about its own internals; neither helps a user.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                output_names=list(output_names), dynamic_shapes=({0: batch},), verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types for unsupported code
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise VisionFTError(f"torch could not export this model to ONNX ({reason})") from None
    return program.model_proto


def describe(metadata: ModelMetadata) -> str:
    """The model's doc_string: what it predicts; the preprocessing is in the metadata."""
    names = ", ".join(metadata.class_names[:8]) + (", ..." if len(metadata.class_names) > 8 else "")
    noun = {"multilabel": "labels", "regression": "targets"}.get(metadata.task, "classes")
    return (f"{metadata.backbone} {task_summary(metadata.task)} for {len(metadata.class_names)} {noun} ({names}); "
            "preprocessing in the vision_ft.* metadata")


def attach_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Write `metadata`, the producer and the description into the exported model."""
    write_metadata(proto, metadata, describe(metadata))
    proto.producer_name = "vision-ft"
    proto.producer_version = vision_ft.__version__


# Protobuf cannot serialise a message of 2 GiB or more into one file.
_MAX_SINGLE_FILE = 2**31 - 2**24


def save_checked(proto: onnx.ModelProto, path: Path) -> None:
    """onnx.checker (with shape inference), then write `path`."""
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    if weights > _MAX_SINGLE_FILE:
        raise VisionFTError(f"the model's weights take {weights / 2**30:.1f} GiB, more than one ONNX file can hold; "
                            "vision-ft exports models up to 2 GiB")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VisionFTError(f"the exported graph fails onnx.checker ({str(exc).splitlines()[0][:160]})") from None
    onnx.save(proto, str(path))


def model_metadata(config: Config, class_names: list[str], mean: list[float], std: list[float],
                   splits: dict[str, list[Sample]], run_root: Path, task: Task | None = None) -> ModelMetadata:
    """The metadata describing a model of `config`, its preprocessing (pixel policy included), what
    its output means (`task`: multi-label thresholds, regression target statistics) and, for a
    classifier, the decision rule (temperature, thresholds) saved in the run folder `run_root`."""
    kind = task.kind if task is not None else "classification"
    return ModelMetadata(
        class_names=list(class_names),
        input_size=[config.data.image_size, config.data.image_size],
        channels=config.data.channels,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        backbone=config.model.name,
        vision_ft_version=vision_ft.__version__,
        split_fingerprint=split_fingerprint(splits),
        finetune_strategy=config.finetune.strategy,
        **policy_from_config(config.data).settings(),
        task=kind,
        task_info=task.metadata() if task is not None else {},
        output_name=task.onnx_output_name if task is not None else "logits",
        decision=(load_decision_rule(run_root, list(class_names)).to_json(list(class_names))
                  if kind == "classification" else {}),
    )


def verification_images(splits: dict[str, list[Sample]], count: int = VERIFY_IMAGES) -> tuple[str, list[Path]]:
    """(split name, up to `count` images) of the run's validation split (test, then train, when it
    is empty), taken round-robin over classes so every class is represented."""
    name = next((n for n in ("val", "test", "train") if splits.get(n)), "val")
    samples = splits.get(name, [])
    existing = [s for s in samples if s.path.is_file()]
    if not existing:
        where = f"under {samples[0].path.parent.parent}" if samples else "listed in the run's split.json"
        raise VisionFTError(
            f"cannot verify the export: the run's images ({where}) are missing; restore the data folder "
            "the run was trained on"
        )
    by_class: dict[int, list[Sample]] = {}
    for sample in existing:
        by_class.setdefault(sample.label, []).append(sample)
    picked: list[Path] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0).path)
    return name, picked


@torch.no_grad()
def torch_logits(model: nn.Module, images: list[Path], metadata: ModelMetadata) -> np.ndarray:
    """Logits of `model` on `images` through the training evaluation pipeline (decode + albumentations)."""
    transform = build_transforms([], metadata.mean, metadata.std, train=False)
    size = tuple(metadata.input_size)
    pixels = policy_from_metadata(metadata)
    batch = torch.stack([transform(image=load_image(p, metadata.channels, size, pixels=pixels))["image"] for p in images])
    return model(batch).float().numpy()


def verify(model: nn.Module, onnx_path: Path, images: list[Path], tolerance: float = TOLERANCE) -> Verification:
    """Compare onnxruntime (runtime preprocessing) with torch (training eval pipeline) on `images`.

    The model is also run on the first image alone, which proves the batch axis is dynamic.
    """
    session = open_session(onnx_path)
    metadata = ModelMetadata.from_properties(session.get_modelmeta().custom_metadata_map, str(onnx_path))
    runtime = OnnxClassifier(session, metadata, str(onnx_path))
    expected = torch_logits(model, images, metadata)
    got = runtime.logits(runtime.preprocess(images))
    single = runtime.logits(runtime.preprocess(images[:1]))
    diff = max(float(np.abs(got - expected).max()), float(np.abs(single[0] - expected[0]).max()))
    allowed = tolerance * max(1.0, float(np.abs(expected).max()) / 10.0)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    return Verification(len(images), diff, allowed, agreement)


def _check_destination(out: Path, force: bool) -> None:
    if out.is_dir():
        raise VisionFTError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not force:
        raise VisionFTError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.suffix.lower() != ".onnx":
        raise VisionFTError(f"--out {out} should end in .onnx, the suffix `vision-ft predict` recognises")


def partial_path(out: Path) -> Path:
    """Where a model is written until it has passed every check: hidden, and not named *.onnx."""
    return out.with_name(f".{out.name}.partial")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A CPU float32 copy of `model` in eval mode with LoRA merged and nothing requiring grad;
    the caller's model (perhaps still training, perhaps on a GPU) is left as it was."""
    model = merge_adapters(copy.deepcopy(model).cpu()).float().eval()
    unfold_norms(model)  # plain conv and BN layers in the exported graph
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def export_model(
    model: nn.Module,
    metadata: ModelMetadata,
    splits: dict[str, list[Sample]],
    out: Path,
    force: bool = False,
    echo: Callable[[str], None] = log.info,
    checks: ExportChecks = ExportChecks(),
    config: Config | None = None,
    task: Task | None = None,
) -> ExportResult:
    """Export `model` (left unchanged) to a verified ONNX file `out`, checked on images of `splits`.

    The run's `task` ends the graph with its head (multi-label: a sigmoid; regression: the
    targets' de-standardisation). With the run's `config`, a pooling + linear classifier also
    gets the class-activation-map output (`export.cam`), so apps draw heatmaps without torch.

    Raises:
        VisionFTError: `out` exists without `force`, the exporter fails, onnx.checker fails, or
        onnxruntime and torch differ by more than `tolerance`. No file is left at `out` in any
        of those cases.
    """
    tolerance, verify_count, opset = checks.tolerance, checks.verify_count, checks.opset
    started = time.perf_counter()
    _check_destination(out, force)
    split_name, images = verification_images(splits, verify_count)
    model = frozen_copy(model)
    classifier = task is None or task.kind == "classification"
    cam_model = cam_classifier_for(model, config) if config is not None and classifier else None
    # The run's test-time augmentation goes into the graph (on the raw outputs, as evaluation
    # averaged them), so the ONNX model predicts what the report measured.
    tta = config.eval.tta if config is not None else "none"
    model = with_views(model, tta)
    if task is not None:
        model = task.export_head(model)
    if cam_model is not None:
        cam_model = with_views(cam_model, tta)
        metadata = replace(metadata, extra={**metadata.extra, "cam_output": CAM_OUTPUT})
    if len(views_of(tta)) > 1:
        metadata = replace(metadata, extra={**metadata.extra, "tta": tta})
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    try:
        outputs = (metadata.output_name, CAM_OUTPUT) if cam_model is not None else (metadata.output_name,)
        proto = to_onnx(cam_model or model, metadata.channels, tuple(metadata.input_size), opset, outputs)
        attach_metadata(proto, metadata)
        save_checked(proto, partial)
        check = verify(model, partial, images, tolerance)
        echo(f"onnxruntime vs torch on {check.images} {split_name} images: {check.summary()}")
        if cam_model is not None:
            cam_diff = check_cam_export(cam_model, partial, images, metadata, tolerance)
            echo(f"class activation maps: max |onnxruntime - torch| {cam_diff:.2e}")
        if check.max_abs_diff > check.allowed:
            raise VisionFTError(
                f"export check failed: onnxruntime and torch logits differ by up to {check.max_abs_diff:.2e} "
                f"(allowed {check.allowed:.1e}, top-1 agreement {check.top1_agreement:.0%}); no model written. "
                f"Report it with the backbone name ({metadata.backbone}), or accept it with --tolerance"
            )
        metadata = replace(metadata, verified_max_abs_diff=check.max_abs_diff)
        attach_metadata(proto, metadata)
        onnx.save(proto, str(partial))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(out, check, metadata, time.perf_counter() - started)


def export_run(
    run_dir: Path,
    out: Path | None = None,
    force: bool = False,
    tolerance: float = TOLERANCE,
    verify_count: int = VERIFY_IMAGES,
    opset: int = OPSET,
    echo: Callable[[str], None] = log.info,
) -> ExportResult:
    """Export a run's best checkpoint to a verified ONNX file (default RUN/model.onnx).

    Raises:
        VisionFTError: as `export_model`.
    """
    if is_anomaly_run(run_dir):
        from vision_ft.anomaly.export import export_anomaly_run

        return export_anomaly_run(run_dir, out, force=force, echo=echo, opset=opset,
                                  **({} if tolerance == TOLERANCE else {"tolerance": tolerance}))
    started = time.perf_counter()
    out = Path(out) if out is not None else open_run_folder(run_dir).onnx
    _check_destination(out, force)  # before the slow model load, so a refusal is immediate
    loaded = load_run(run_dir)
    _, splits = load_split(loaded.run.split)
    metadata = model_metadata(loaded.config, loaded.class_names, loaded.mean, loaded.std, splits, loaded.run.root,
                              loaded.task)
    result = export_model(loaded.model, metadata, splits, out, force, echo, ExportChecks(tolerance, verify_count, opset),
                          loaded.config, loaded.task)
    return replace(result, seconds=time.perf_counter() - started)
