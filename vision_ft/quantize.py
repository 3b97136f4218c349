"""`vision-ft quantize RUN` (or `export --int8`): static INT8 quantization with onnxruntime's tools.

The fp32 export is prepared with `quant_pre_process` (shape inference and fusions, so Conv+BN+ReLU
quantize as one unit), calibrated on the run's training images through the runtime's own
preprocessing, and quantized by `quantize_static` in QDQ format: uint8 activations (MinMax
ranges), int8 weights per output channel. These are onnxruntime's recommendations for x86 CPUs
with VNNI and for ARM; per-channel weights keep the accuracy of conv nets whose filters differ
in scale. The result, model.int8.onnx, keeps the fp32 model's metadata with
``quantization = "int8-static-qdq"``, so the runtime loads it the same way.

The command reports what quantization cost and gained: accuracy of both models on the run's
test split, how often their top-1 classes agree, and images per second of both.

Torch is not needed here: everything runs through onnxruntime.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from vision_ft.data.discover import Sample
from vision_ft.data.split import load_split, split_fingerprint
from vision_ft.errors import VisionFTError
from vision_ft.onnx_metadata import read_metadata, write_metadata
from vision_ft.run_folder import open_run_folder
from vision_ft.runtime import OnnxClassifier, load_model

QUANTIZATION = "int8-static-qdq"
# MinMax ranges settle after a few dozen images of a narrow domain (inspection, X-ray); more only
# lengthens calibration.
CALIBRATION_IMAGES = 128
CALIBRATION_BATCH = 16
SPEED_BATCH = 32

log = logging.getLogger("vision_ft")


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    calibration_images: int
    test_split: str
    test_images: int
    fp32_accuracy: float
    int8_accuracy: float
    top1_agreement: float  # fraction of test images where both models pick the same class
    fp32_images_per_s: float
    int8_images_per_s: float
    fp32_bytes: int
    int8_bytes: int

    def summary(self) -> list[str]:
        """Lines for the command to print."""
        change = (self.int8_accuracy - self.fp32_accuracy) * 100
        return [
            f"accuracy on {self.test_images} {self.test_split} images: fp32 {self.fp32_accuracy:.4f}, "
            f"int8 {self.int8_accuracy:.4f} ({change:+.2f} points); top-1 agreement {self.top1_agreement:.1%}",
            f"speed (batch {SPEED_BATCH}, onnxruntime CPU): fp32 {self.fp32_images_per_s:.1f} images/s, "
            f"int8 {self.int8_images_per_s:.1f} images/s ({self.int8_images_per_s / self.fp32_images_per_s:.2f}x)",
            f"size: fp32 {self.fp32_bytes / 1e6:.1f} MB, int8 {self.int8_bytes / 1e6:.1f} MB",
        ]


class _CalibrationBatches(CalibrationDataReader):
    """Feeds `quantize_static` preprocessed batches of calibration images."""

    def __init__(self, model: OnnxClassifier, images: list[Path], batch_size: int = CALIBRATION_BATCH) -> None:
        self._model = model
        self._chunks = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        return {self._model.metadata.input_name: self._model.preprocess(chunk)}


def spread_over_classes(samples: list[Sample], count: int) -> list[Sample]:
    """Up to `count` samples taken round-robin over classes (deterministic)."""
    queues: dict[int, list[Sample]] = {}
    for sample in samples:
        queues.setdefault(sample.label, []).append(sample)
    ordered = [queues[label] for label in sorted(queues)]
    picked: list[Sample] = []
    while len(picked) < count and any(ordered):
        for queue in ordered:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def quantize_model(fp32_path: Path, out: Path, calibration: list[Path]) -> None:
    """Write the static INT8 version of an exported model to `out` (metadata carried over)."""
    model = load_model(fp32_path)
    if model.metadata.quantization != "none":
        raise VisionFTError(f"{fp32_path} is already quantized ({model.metadata.quantization}); pass the fp32 model.onnx")
    if not calibration:
        raise VisionFTError("no calibration images: the run's training split is empty or its files are missing")
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quantized = Path(work) / "quantized.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared), str(quantized), _CalibrationBatches(model, calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(quantized))
        metadata = replace(model.metadata, quantization=QUANTIZATION,
                           extra={**model.metadata.extra, "calibration_images": len(calibration)})
        write_metadata(proto, metadata, f"{metadata.backbone} classifier for {len(metadata.class_names)} classes, "
                                        "static INT8 (QDQ); preprocessing in the vision_ft.* metadata")
        onnx.checker.check_model(proto)
        read_metadata(proto, str(out))  # fails loudly if the metadata did not survive
        staged = Path(work) / "staged.onnx"
        onnx.save(proto, str(staged))
        os.replace(staged, out)


def images_per_second(model: OnnxClassifier, batch: np.ndarray, repeats: int = 5) -> float:
    """Median throughput of `model.logits` on `batch` after one warm-up run."""
    model.logits(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.logits(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / float(np.median(times))


def compare_models(fp32: OnnxClassifier, int8: OnnxClassifier, samples: list[Sample]) -> tuple[float, float, float, float, float]:
    """(fp32 accuracy, int8 accuracy, top-1 agreement, fp32 images/s, int8 images/s) on `samples`."""
    labels = np.array([s.label for s in samples])
    paths = [s.path for s in samples]
    top32 = fp32.predict_proba(paths).argmax(1)
    top8 = int8.predict_proba(paths).argmax(1)
    speed_paths = (paths * (SPEED_BATCH // len(paths) + 1))[:SPEED_BATCH]
    batch = fp32.preprocess(speed_paths)
    return (float((top32 == labels).mean()), float((top8 == labels).mean()), float((top32 == top8).mean()),
            images_per_second(fp32, batch), images_per_second(int8, batch))


def check_model_belongs_to_run(model_path: Path, class_names: list[str], splits: dict[str, list[Sample]],
                               run_root: Path) -> None:
    """Refuse a model exported from another run: its accuracy on this run's labels would mean nothing."""
    metadata = load_model(model_path).metadata
    if metadata.class_names != class_names:
        raise VisionFTError(
            f"{model_path} classifies {len(metadata.class_names)} classes ({', '.join(metadata.class_names[:4])}"
            f"{', …' if len(metadata.class_names) > 4 else ''}) but run {run_root} has {len(class_names)} "
            f"({', '.join(class_names[:4])}{', …' if len(class_names) > 4 else ''}); pass the model of this run"
        )
    if metadata.split_fingerprint != split_fingerprint(splits):
        raise VisionFTError(
            f"{model_path} was trained on another split than run {run_root} (fingerprint "
            f"{metadata.split_fingerprint} vs {split_fingerprint(splits)}); pass the model of this run, or the run it came from"
        )


def int8_path(onnx_path: Path) -> Path:
    """Where the INT8 version of a model goes by default: model.onnx -> model.int8.onnx."""
    return onnx_path.with_name(onnx_path.stem + ".int8.onnx")


def check_destination(out: Path, force: bool) -> None:
    """Refuse to replace an existing INT8 model without `force` (checked before any slow work)."""
    if out.exists() and not force:
        raise VisionFTError(f"{out} already exists; pass --force to replace it, or choose another --out")


def quantize_run(
    run_dir: Path,
    source: Path | None = None,
    out: Path | None = None,
    force: bool = False,
    calibration_count: int = CALIBRATION_IMAGES,
    echo: Callable[[str], None] = log.info,
) -> QuantizeResult:
    """Quantize a run's exported model (default RUN/model.onnx) to `out` (default: model.int8.onnx
    beside it) and measure the accuracy and speed change on the run's test split.

    Raises:
        VisionFTError: no fp32 export yet, `out` exists without `force`, or missing images.
    """
    run = open_run_folder(run_dir)
    source = Path(source) if source is not None else run.onnx
    out = Path(out) if out is not None else int8_path(source)
    if not source.is_file():
        raise VisionFTError(f"{source} does not exist; run `vision-ft export {run.root}` first (or export with --int8)")
    check_destination(out, force)
    if out.resolve() == source.resolve():
        raise VisionFTError(f"--out {out} is the fp32 model itself; choose another file")
    if calibration_count < 1:
        raise VisionFTError(f"--calibration-images {calibration_count} must be at least 1")
    if load_model(source).task != "classification":
        raise VisionFTError(f"{source} is a {load_model(source).task} model; INT8 quantization measures top-1 accuracy "
                            "and supports classification models only")
    class_names, splits = load_split(run.split)
    check_model_belongs_to_run(source, class_names, splits, run.root)
    calibration = [s.path for s in spread_over_classes(splits["train"], calibration_count) if s.path.is_file()]
    test_split = "test" if splits.get("test") else "val"
    test = [s for s in splits.get(test_split, []) if s.path.is_file()]
    if not test:
        raise VisionFTError("the run has no readable test or validation images to measure the INT8 model on; "
                            "restore the data folder the run was trained on")
    echo(f"calibrating on {len(calibration)} training images")
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_model(source, out, calibration)
    try:
        measured = compare_models(load_model(source), load_model(out), test)
    except BaseException:
        out.unlink(missing_ok=True)  # an unmeasured model is not one to ship
        raise
    return QuantizeResult(out, len(calibration), test_split, len(test), *measured,
                          fp32_bytes=source.stat().st_size, int8_bytes=out.stat().st_size)
