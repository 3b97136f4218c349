"""The deployment contract stored inside an exported ONNX model.

Everything an application needs to turn an image into the model's input, and the model's output
into a label, travels in the model file as ONNX ``metadata_props``: one key per field, named
``vision_ft.<field>``, each value JSON-encoded (Netron and ``onnx`` list them as a readable
table). Imports only the standard library, so the torch-free runtime can read it.

The preprocessing it describes is the training evaluation pipeline:

1. ``vision_ft.data.decode.load_image(source, channels, input_size, pixels)``: decode, EXIF
   orientation, 8-bit conversion by the recorded intensity policy and DICOM window/frame
   (``intensity``, ``dicom_window``, ``dicom_frame``), channel conversion, Pillow bilinear resize
   to ``input_size`` (no crop);
2. ``(pixel / 255 - mean) / std`` per channel, as float32;
3. H x W x C -> C x H x W, stacked into an N x C x H x W batch.

The output named ``output_name`` depends on ``task`` (`vision_ft.tasks.postprocess`):
classification: logits (N x classes), softmax gives probabilities; multilabel: sigmoid
probabilities (N x labels), ``task_info["thresholds"]`` turns them into label sets; regression:
values in the targets' units (N x targets). ``class_names`` names the classes, labels or targets.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

from vision_ft.errors import VisionFTError

# Bump when a field changes meaning; readers refuse newer formats instead of guessing.
# 2: intensity policy, DICOM window/frame and the task (what the output means) travel too.
METADATA_FORMAT = 2
PREFIX = "vision_ft."
FORMAT_KEY = PREFIX + "format"

# The preprocessing steps this version of vision-ft implements (see the module docstring).
RESIZE_POLICY = "pil_bilinear"
CROP_POLICY = "none"
DECODE_POLICY = 1  # the policy documented in vision_ft.data.decode
# What the output means (see the module docstring); anomaly models are vision_ft.anomaly's.
TASKS = ("classification", "multilabel", "regression", "anomaly")


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported model needs around it: class names, input geometry, normalisation, provenance."""

    class_names: list[str]
    input_size: list[int]  # [height, width] the image is resized to
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: list[float]  # per channel, on the 0..1 pixel scale
    std: list[float]
    backbone: str  # the timm model name
    vision_ft_version: str
    split_fingerprint: str  # vision_ft.data.split.split_fingerprint of the training split
    finetune_strategy: str = "full"
    resize: str = RESIZE_POLICY
    crop: str = CROP_POLICY
    decode_policy: int = DECODE_POLICY
    input_name: str = "image"
    output_name: str = "logits"
    quantization: str = "none"  # "none" or "int8-static-qdq"
    # Largest |onnxruntime - torch| logit difference measured when the model was exported.
    verified_max_abs_diff: float | None = None
    # How >8-bit images become 8-bit (vision_ft.data.intensity / vision_ft.data.dicom).
    intensity: str = "auto"
    dicom_window: Any = "file"
    dicom_frame: int | None = None
    task: str = "classification"  # one of TASKS
    task_info: dict[str, Any] = field(default_factory=dict)  # multilabel: thresholds; regression: target statistics
    # Temperature and operating thresholds chosen on validation (vision_ft.decision.DecisionRule
    # as JSON, by class name); empty: plain softmax and argmax. Classification only.
    decision: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_properties(self) -> dict[str, str]:
        """ONNX ``metadata_props`` entries: ``vision_ft.<field>`` -> JSON text."""
        properties = {FORMAT_KEY: json.dumps(METADATA_FORMAT)}
        for name, value in asdict(self).items():
            properties[PREFIX + name] = json.dumps(value)
        return properties

    @classmethod
    def from_properties(cls, properties: Mapping[str, str], source: str) -> "ModelMetadata":
        """Parse the entries written by `to_properties`; `source` names the model file in errors.

        Raises:
            VisionFTError: no vision-ft metadata, a newer format, or a missing or malformed field.
        """
        if FORMAT_KEY not in properties:
            raise VisionFTError(
                f"{source} has no vision-ft metadata (class names, input size, normalisation); "
                "export the model with `vision-ft export RUN`"
            )
        try:
            version = int(json.loads(properties[FORMAT_KEY]))
        except (ValueError, TypeError):
            raise VisionFTError(f"{source}: metadata key {FORMAT_KEY} is malformed; export the model again") from None
        if version > METADATA_FORMAT:
            raise VisionFTError(
                f"{source} was exported by a newer vision-ft (metadata format {version}, this one reads "
                f"{METADATA_FORMAT}); upgrade vision-ft"
            )
        values: dict[str, Any] = {}
        for spec in fields(cls):
            key = PREFIX + spec.name
            if key not in properties:
                if spec.default is not MISSING or spec.default_factory is not MISSING:
                    continue  # optional: older exports may lack it
                raise VisionFTError(f"{source}: metadata key {key} is missing; export the model again")
            try:
                values[spec.name] = json.loads(properties[key])
            except ValueError:
                raise VisionFTError(f"{source}: metadata key {key} is not valid JSON; export the model again") from None
        metadata = cls(**values)
        metadata.check(source)
        return metadata

    def check(self, source: str) -> None:
        """Raise VisionFTError when the fields are inconsistent or ask for preprocessing we lack.

        Types are checked before values: metadata is read from a file anyone can edit, and a
        string where a number belongs must end in this one line, not in a TypeError later.
        """
        problem = _first_problem(self)
        temperature = self.decision.get("temperature", 1.0) if isinstance(self.decision, dict) else None
        if problem is None and (not _is_number(temperature) or temperature <= 0):
            problem = f"decision {_short(self.decision)} must be a mapping with a positive temperature"
        elif problem is None and any(name not in self.class_names for name in
                                     [self.decision.get("positive_class") or self.class_names[0],
                                      *(self.decision.get("class_thresholds") or {})]):
            problem = f"decision {_short(self.decision)} names a class that is not in class_names"
        if problem:
            raise VisionFTError(f"{source}: bad vision-ft metadata ({problem}); export the model again")
        policy = (self.resize, self.crop, self.decode_policy)
        if policy != (RESIZE_POLICY, CROP_POLICY, DECODE_POLICY):
            raise VisionFTError(
                f"{source} needs preprocessing resize={self.resize}, crop={self.crop}, decode policy "
                f"{self.decode_policy}, which this vision-ft does not implement; upgrade vision-ft"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _first_problem(meta: ModelMetadata) -> str | None:
    """What is wrong with `meta`'s fields, shortest first; None when all are usable."""
    names = meta.class_names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        return "class_names must be a non-empty list of non-empty strings"
    if len(set(names)) != len(names):
        return "class_names has duplicates"
    if not isinstance(meta.input_size, list) or len(meta.input_size) != 2 or not all(map(_is_count, meta.input_size)):
        return f"input_size {_short(meta.input_size)} must be [height, width], two positive integers"
    if meta.channels not in (1, 3) or isinstance(meta.channels, bool):
        return f"channels {_short(meta.channels)} must be 1 or 3"
    for name in ("mean", "std"):
        values = getattr(meta, name)
        if not isinstance(values, list) or len(values) != meta.channels or not all(map(_is_number, values)):
            return f"{name} {_short(values)} must be {meta.channels} finite numbers"
    if any(s <= 0 for s in meta.std):
        return f"std {meta.std} must be positive"
    for name in ("input_name", "output_name", "backbone"):
        if not isinstance(getattr(meta, name), str):
            return f"{name} must be a string"
    if meta.task not in TASKS:
        return f"task {_short(meta.task)} is not one of {', '.join(TASKS)}"
    thresholds = meta.task_info.get("thresholds") if isinstance(meta.task_info, dict) else None
    if meta.task == "multilabel" and (not isinstance(thresholds, list) or len(thresholds) != len(names)
                                      or not all(map(_is_number, thresholds))):
        return "a multilabel model needs one numeric threshold per label in task_info"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_metadata(proto: Any, metadata: ModelMetadata, description: str | None = None) -> None:
    """Store `metadata` in an ``onnx.ModelProto`` (in place), replacing earlier vision-ft entries.

    Entries of other tools are kept. `description` becomes the model's doc_string.
    """
    properties = metadata.to_properties()
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in [*kept, *properties.items()]:
        proto.metadata_props.add(key=key, value=value)
    if description is not None:
        proto.doc_string = description


def read_metadata(proto: Any, source: str) -> ModelMetadata:
    """The vision-ft metadata of an ``onnx.ModelProto``; see `ModelMetadata.from_properties`."""
    return ModelMetadata.from_properties({p.key: p.value for p in proto.metadata_props}, source)
