"""Run an exported model without torch: image files, numpy arrays or Pillow images in, labels out.

Imports only numpy, onnxruntime, Pillow and vision-ft's torch-free modules (decode, metadata,
errors), so an inspection station or a hospital viewer can ship it without torch, timm or
albumentations. Preprocessing is read from the model's metadata and equals the training
evaluation pipeline (see `vision_ft.onnx_metadata`), so no config file is needed::

    from vision_ft.runtime import load_model

    model = load_model("model.onnx")
    for p in model.predict(["part_001.png", "part_002.png"], threshold=0.8):
        print(p.label, p.score)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from vision_ft.data.decode import ImageSource, load_image
from vision_ft.data.pixel_policy import policy_from_metadata
from vision_ft.decision import UNCERTAIN, DecisionRule
from vision_ft.errors import VisionFTError
from vision_ft.onnx_metadata import ModelMetadata
from vision_ft.tasks.postprocess import (  # noqa: F401
    label_sets,
    onnx_outputs_to_scores,
    prediction_table,
    softmax,
)

# The label of an image the model gave no usable answer for (non-finite outputs, an unreadable
# file skipped on request); `Prediction.error` says why. Never one of the class names.
ERROR = "error"
NON_FINITE = "the model's output is not finite (NaN or inf): its weights are damaged or it overflowed on this image"
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    classification: `label` is the most likely class, or `UNCERTAIN` when `score` fell below the
    threshold. multilabel: `labels` is the set of labels at or above their thresholds, `label`
    the same joined by ";", `probabilities` one per label. regression: `values`, one per target
    in the targets' units (`label` and `score` are empty). Any task: `label` is `ERROR` (with
    `error` saying why) when the model's outputs for the image are not finite numbers.
    """

    label: str
    score: float  # probability of the most likely class or label (NaN with ERROR and for regression)
    top_class: str  # the most likely class, also when the label is UNCERTAIN ("" with ERROR)
    probabilities: np.ndarray  # one per class or label, in `OnnxClassifier.class_names` order
    error: str | None = None
    labels: frozenset[str] = frozenset()  # multilabel: the labels above their thresholds
    values: np.ndarray | None = None  # regression: one value per target


def session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """The onnxruntime settings every vision-ft session uses (runtime, verification, benchmark).

    All graph optimisations (constant folding, Conv+BN/activation fusion, layout transforms);
    `threads` sets the intra-op pool (None: onnxruntime's default, one per physical core).
    inter-op threads stay at 1: these graphs are a single chain, parallel branches gain nothing.
    Without `spin`, idle pool threads sleep instead of busy-waiting: when anything else shares
    the cores (our own decode threads, other jobs) spinning threads steal their time; measured
    on 2 shared cores, resnet18 batch 1 took 47 ms with spinning and 24 ms without.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: the optimiser's notes are not for end users
    return options


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # onnxruntime prefixes its messages with "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : ".
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.rsplit(" : ", 1)[-1][:120]


def open_session(path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session for `path`; a missing or unreadable file raises one-line VisionFTError."""
    path = Path(path)
    if not path.exists():
        raise VisionFTError(f"model file {path} does not exist; pass the model.onnx written by `vision-ft export RUN`")
    if path.is_dir():
        raise VisionFTError(f"{path} is a folder; pass the model.onnx file inside it")
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        raise VisionFTError(
            f"{path} is not a readable ONNX model ({_first_line(exc)}); export it again with `vision-ft export RUN`"
        ) from None


class OnnxClassifier:
    """An exported vision-ft model with the preprocessing its metadata describes."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, source: str, decode_workers: int | None = None) -> None:
        self.session = session
        self.metadata = metadata
        self.source = source
        self.decode_workers = decode_workers or min(4, os.cpu_count() or 1)
        mean = np.asarray(metadata.mean, dtype=np.float64)
        std = np.asarray(metadata.std, dtype=np.float64)
        # One float32 value per (pixel value, channel): (v / 255 - mean) / std, rounded once from
        # float64. Matches albumentations' Normalize to within 1 ulp (2.4e-7 measured).
        self._lut = ((np.arange(256, dtype=np.float64)[:, None] / 255.0 - mean) / std).astype(np.float32)
        self.pixels = policy_from_metadata(metadata)
        self._check_signature()
        # Temperature and thresholds chosen after training; the same numpy code as torch's path.
        self.rule = DecisionRule.from_json(metadata.decision, list(metadata.class_names))

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        meta = self.metadata
        if meta.input_name not in inputs or meta.output_name not in outputs:
            raise VisionFTError(
                f"{self.source}: the graph has no input '{meta.input_name}' / output '{meta.output_name}' that its "
                "metadata names; export the model again"
            )
        shape = inputs[meta.input_name].shape
        expected = [meta.channels, *meta.input_size]
        if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != expected:
            raise VisionFTError(
                f"{self.source}: input shape {shape} does not match its metadata (N x {expected}); export the model again"
            )
        output_shape = next(o.shape for o in self.session.get_outputs() if o.name == meta.output_name)
        classes = output_shape[-1] if output_shape else None
        if isinstance(classes, int) and classes != len(meta.class_names):
            # Checked here and not per call: a mismatch would label images with the wrong names.
            raise VisionFTError(
                f"{self.source}: the graph outputs {classes} scores but its metadata names {len(meta.class_names)} "
                "classes; export the model again"
            )

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    @property
    def task(self) -> str:
        """classification, multilabel or regression: what the scores mean."""
        return self.metadata.task

    @property
    def thresholds(self) -> list[float] | None:
        """Per-label thresholds of a multi-label model (chosen on the validation split), else None."""
        return self.metadata.task_info.get("thresholds") if self.task == "multilabel" else None

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) images are resized to."""
        height, width = self.metadata.input_size
        return height, width

    def _decode(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        meta = self.metadata

        def decode(source: ImageSource) -> np.ndarray:
            return load_image(source, meta.channels, self.input_size, pixels=self.pixels)

        if len(images) == 1 or self.decode_workers <= 1:
            return [decode(source) for source in images]
        # Threads suffice: Pillow releases the GIL while decoding and resizing.
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            return list(pool.map(decode, images))

    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """The model input for `images`: float32 N x C x H x W, as the training eval pipeline makes it."""
        pixels = np.stack(self._decode(images))  # N x H x W x C uint8
        normalised = self._lut[pixels, np.arange(self.metadata.channels)]
        return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs (N x outputs) for a preprocessed batch: logits, sigmoid probabilities or values."""
        meta = self.metadata
        logits = self.session.run([meta.output_name], {meta.input_name: batch})[0]
        if logits.ndim != 2 or logits.shape[1] != len(meta.class_names):
            raise VisionFTError(
                f"{self.source}: the graph returned scores of shape {logits.shape} for {len(meta.class_names)} "
                "classes in its metadata; export the model again"
            )
        return logits

    def probabilities_and_maps(self, images: Sequence[ImageSource], batch_size: int = DEFAULT_BATCH_SIZE,
                               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(probabilities N x classes, each image's class activation map for its top class, h x w)
        of a model exported with a 'cam' output (CNN classifiers with a pooling + linear head)."""
        meta = self.metadata
        cam_output = meta.extra.get("cam_output")
        if not cam_output:
            raise VisionFTError(f"{self.source} has no class-activation-map output; export the run again "
                                "(CNN classifiers with a pooling + linear head get one), or draw heatmaps from the run folder")
        probs, maps = [], []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            logits, cams = self.session.run([meta.output_name, cam_output], {meta.input_name: self.preprocess(chunk)})
            batch_probs = softmax(logits)
            probs.append(batch_probs)
            maps.extend(cams[np.arange(len(cams)), batch_probs.argmax(1)])
            if progress is not None:
                progress(len(chunk))
        return (np.concatenate(probs) if probs else np.zeros((0, len(meta.class_names)))), maps

    def predict_proba(
        self,
        images: Sequence[ImageSource],
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Scores (N x outputs) for a list of file paths, arrays or Pillow images: class
        probabilities, per-label probabilities (multilabel) or values (regression).

        Runs in batches of `batch_size`; the next batch is decoded while the current one runs
        (onnxruntime releases the GIL). `progress` is called with the number of images done per
        batch, e.g. a tqdm bar's `update`.
        """
        if batch_size < 1:
            raise VisionFTError(f"batch size {batch_size} must be at least 1")
        images = list(images)
        chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        if not chunks:
            return np.zeros((0, len(self.metadata.class_names)))
        results = []
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(self.preprocess, chunks[0])
            for index, chunk in enumerate(chunks):
                batch = pending.result()
                if index + 1 < len(chunks):
                    pending = prefetch.submit(self.preprocess, chunks[index + 1])
                raw = self.logits(batch)
                # Classification: softmax with the model's temperature; the other tasks' graphs end in their scores.
                results.append(self.rule.probabilities(raw) if self.task == "classification"
                               else onnx_outputs_to_scores(self.task, raw))
                if progress is not None:
                    progress(len(chunk))
        return np.concatenate(results)

    def predict(
        self, images: Sequence[ImageSource], threshold: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[Prediction]:
        """A Prediction per image, labelled by the model's decision rule (its operating thresholds, see
        `vision_ft.decision`); below `threshold` the label is `UNCERTAIN` (for manual inspection).
        Multi-label models return label sets, regressors values (see `Prediction`)."""
        return predictions(self.predict_proba(images, batch_size), self.class_names, threshold, self.rule,
                           self.task, self.thresholds)

    def prediction_table(self, paths: Sequence[Path | str], scores: np.ndarray, top_k: int = 3) -> tuple[list[str], list[list[str]]]:
        """CSV header and rows for `scores` of `paths`, as `vision-ft predict` writes them (multilabel, regression)."""
        return prediction_table(self.task, paths, scores, self.class_names, top_k, self.thresholds)

    def predict_one(self, image: ImageSource, threshold: float | None = None) -> Prediction:
        """`predict` for a single path, array or Pillow image."""
        return self.predict([image], threshold)[0]


def load_model(
    path: Path | str,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    decode_workers: int | None = None,
) -> OnnxClassifier:
    """Load a model written by `vision-ft export` (or `quantize`).

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (None: one per physical core).
        providers: onnxruntime execution providers (default: CPU only, the same everywhere).
        decode_workers: threads decoding images (default: up to 4).

    Raises:
        VisionFTError: the file is missing or unreadable, or carries no vision-ft metadata.
    """
    session = open_session(path, threads, providers)
    metadata = ModelMetadata.from_properties(session.get_modelmeta().custom_metadata_map, str(path))
    if metadata.task == "anomaly" or metadata.extra.get("task") == "anomaly":
        from vision_ft.anomaly.runtime import OnnxAnomalyDetector

        return OnnxAnomalyDetector(session, metadata, str(path), decode_workers)
    return OnnxClassifier(session, metadata, str(path), decode_workers)


def predictions_from_scores(scores: np.ndarray, names: Sequence[str], task: str = "classification",
                            thresholds: Sequence[float] | None = None, threshold: float | None = None) -> list[Prediction]:
    """A Prediction per row of `scores` (see `Prediction`); the torch `Run.predict` uses it too."""
    check_threshold(threshold)
    names = list(names)
    if task == "regression":
        return [Prediction("", float("nan"), "", row, values=row) for row in scores]
    if task == "multilabel":
        sets = label_sets(scores, names, thresholds if thresholds is not None else [0.5] * len(names))
        return [Prediction(";".join(s), float(row.max()), names[int(np.argmax(row))], row, labels=frozenset(s))
                for s, row in zip(sets, scores)]
    result = []
    for probs in scores:
        best = int(np.argmax(probs))
        score = float(probs[best])
        label = UNCERTAIN if threshold is not None and score < threshold else names[best]
        result.append(Prediction(label, score, names[best], probs))
    return result


def check_threshold(threshold: float | None) -> None:
    """Raise VisionFTError unless `threshold` is None or a probability in (0, 1]."""
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise VisionFTError(f"threshold {threshold} is not a probability; use a value in (0, 1], e.g. 0.8")


def mark_uncertain(probs: np.ndarray, class_names: Sequence[str], threshold: float | None,
                   rule: DecisionRule | None = None) -> list[str]:
    """The label of each row of `probs` (N x classes) by `rule` (default: the most likely class),
    or UNCERTAIN where the decided class's probability is below `threshold` (None: never)."""
    check_threshold(threshold)
    return (rule or DecisionRule()).labels(np.asarray(probs), list(class_names), reject_below=threshold)


def predictions(probs: np.ndarray, class_names: Sequence[str], threshold: float | None = None,
                rule: DecisionRule | None = None, task: str = "classification",
                thresholds: Sequence[float] | None = None) -> list[Prediction]:
    """A Prediction per row of `probs` (a task's scores, see `Prediction`): classes labelled as
    `mark_uncertain` says, label sets above the per-label `thresholds`, or regression values.
    The ONNX runtime and a run folder's torch model (`vision_ft.load_run(...).predict`) share it."""
    probs = np.asarray(probs)
    names = list(class_names)
    finite = np.isfinite(probs).all(axis=1) if probs.size else np.zeros(len(probs), dtype=bool)
    if task == "regression":
        check_threshold(threshold)
        answers = [Prediction("", float("nan"), "", row, values=row) for row in probs]
    elif task == "multilabel":
        check_threshold(threshold)
        sets = label_sets(probs, names, thresholds if thresholds is not None else [0.5] * len(names))
        answers = [Prediction(";".join(s), float(row.max()), names[int(np.argmax(row))], row, labels=frozenset(s))
                   for s, row in zip(sets, probs)]
    else:
        labels = mark_uncertain(probs, names, threshold, rule)
        best = probs.argmax(axis=1) if probs.size else []
        answers = [Prediction(label, float(row[index]), names[index], row)
                   for row, index, label in zip(probs, best, labels)]
    # NaN never becomes a label, nor passes a threshold
    return [answer if ok else Prediction(ERROR, float("nan"), "", row, NON_FINITE)
            for answer, ok, row in zip(answers, finite, probs)]
