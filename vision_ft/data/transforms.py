"""Albumentations pipelines built from the recipe's augmentation list.

A spec is a list of dicts, each naming an albumentations transform and its arguments::

    [{"name": "HorizontalFlip", "p": 0.5},
     {"name": "Affine", "rotate": [-10, 10], "p": 0.3},
     {"name": "OneOf", "p": 0.5, "transforms": [{"name": "GaussianBlur"}, {"name": "GaussNoise"}]}]

YAML lists become tuples, which is what albumentations expects for ranges. Images arrive already
resized by `vision_ft.data.decode`, so the spec holds augmentations only: `Normalize` and
`ToTensorV2` are appended here, for training and evaluation alike.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from typing import Any

# albumentations otherwise asks PyPI for a newer version on import: a delay and a warning on
# the offline machines (factory floors, hospitals) this toolkit runs on.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
from albumentations.core.composition import BaseCompose  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from vision_ft.errors import VisionFTError  # noqa: E402

SPEC_KEY = "data.augment.train"

# Appended by build_transforms; a second copy in the spec would normalise twice.
_ADDED_AUTOMATICALLY = frozenset({"Normalize", "ToTensorV2"})
# Transforms that need targets a classification sample does not have (boxes, masks, reference
# images, callables), or that change the pixel dtype Normalize expects.
_UNSUITABLE = {
    "AtLeastOneBBoxRandomCrop": "needs bounding boxes",
    "BBoxSafeRandomCrop": "needs bounding boxes",
    "RandomSizedBBoxSafeCrop": "needs bounding boxes",
    "RandomCropNearBBox": "needs bounding boxes",
    "CropNonEmptyMaskIfExists": "needs a mask",
    "MaskDropout": "needs a mask",
    "Mosaic": "needs extra images as metadata",
    "OverlayElements": "needs overlay metadata",
    "TextImage": "needs text metadata",
    "FDA": "needs reference images",
    "HistogramMatching": "needs reference images",
    "PixelDistributionAdaptation": "needs reference images",
    "Lambda": "needs Python functions, which a recipe cannot hold",
    "ToFloat": "changes the pixel range that Normalize expects",
    "FromFloat": "changes the pixel range that Normalize expects",
}
_ABSTRACT = frozenset({"BasicTransform", "DualTransform", "ImageOnlyTransform", "Transform3D", "NoOp"})
# Compositions take nested specs under "transforms".
_COMPOSITIONS = frozenset({"OneOf", "SomeOf", "Sequential", "RandomOrder"})


@functools.lru_cache(maxsize=1)
def _transform_names() -> tuple[str, ...]:
    names = []
    for name in dir(A):
        cls = getattr(A, name)
        if not isinstance(cls, type) or name in _ABSTRACT or name.endswith("3D"):
            continue
        if name in _ADDED_AUTOMATICALLY or name in _UNSUITABLE:
            continue
        if issubclass(cls, A.BasicTransform) or name in _COMPOSITIONS:
            names.append(name)
    return tuple(sorted(names))


def available_transforms() -> list[str]:
    """Names usable in an augmentation spec."""
    return list(_transform_names())


def _suggest(word: str, choices: list[str]) -> str:
    by_lower = {c.lower(): c for c in choices}
    close = [by_lower[m] for m in difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _as_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


def _explain_invalid(exc: Exception) -> str:
    """First problem of a pydantic ValidationError (or any ValueError) as a short phrase."""
    # albumentations re-raises pydantic's ValidationError as a plain ValueError chained to it.
    detailed = exc if hasattr(exc, "errors") else exc.__cause__ or exc
    errors = getattr(detailed, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except (IndexError, TypeError):
            first = None
        if first:
            loc = first.get("loc", ())
            field = str(loc[0]) if loc else ""  # later parts name union members, not arguments
            if first.get("type") == "missing":
                return f"needs the argument {field!r}"
            field_text = f"argument {field!r}" if field else "arguments"
            message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            given = first.get("input")
            if field and not isinstance(given, dict) and repr(given) not in message:
                message += f" (got {given!r})"
            return f"bad {field_text}: {message}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _build_one(spec: Any, where: str) -> A.BasicTransform | BaseCompose:
    if not isinstance(spec, dict):
        raise VisionFTError(f"{where} must be a mapping like {{name: HorizontalFlip, p: 0.5}}, got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise VisionFTError(f"{where} has no 'name'; give the albumentations transform name, e.g. name: HorizontalFlip")
    if name in _ADDED_AUTOMATICALLY:
        raise VisionFTError(f"{where}: {name} is added automatically (set data.mean/data.std instead); remove it")
    if name in _UNSUITABLE:
        raise VisionFTError(f"{where}: {name} {_UNSUITABLE[name]}, so it cannot be used for classification; remove it")
    names = available_transforms()
    if name not in names:
        raise VisionFTError(f"{where}: unknown transform {name!r}{_suggest(name, names)} (albumentations {A.__version__})")
    cls = getattr(A, name)
    kwargs = {k: v for k, v in spec.items() if k != "name"}

    if name in _COMPOSITIONS:
        children = kwargs.pop("transforms", None)
        if not isinstance(children, list) or not children:
            raise VisionFTError(f"{where}: {name} needs a non-empty 'transforms' list of transform specs")
        kwargs["transforms"] = [_build_one(child, f"{where}.transforms[{j}]") for j, child in enumerate(children)]

    parameters = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in kwargs if k not in parameters]
    if unknown:
        raise VisionFTError(
            f"{where}: {name} has no argument {unknown[0]!r}{_suggest(unknown[0], parameters)} "
            f"(its arguments: {', '.join(parameters)})"
        )
    converted = {k: (v if k == "transforms" else _as_tuples(v)) for k, v in kwargs.items()}
    try:
        return cls(**converted)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise VisionFTError(f"{where}: {name} {_explain_invalid(exc)}") from None


def _build_steps(augment: list[dict[str, Any]] | None) -> list[A.BasicTransform | BaseCompose]:
    if augment is None:
        return []
    if not isinstance(augment, list):
        raise VisionFTError(f"{SPEC_KEY} must be a list of transform specs, got {type(augment).__name__}")
    return [_build_one(spec, f"{SPEC_KEY}[{i}]") for i, spec in enumerate(augment)]


def validate_augment_spec(augment: list[dict[str, Any]]) -> None:
    """Raise VisionFTError naming the first bad transform name or argument in `augment`."""
    _build_steps(augment)


def _check_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise VisionFTError(f"mean {list(mean)} and std {list(std)} need the same length, 1 or 3; fix data.mean / data.std")
    if any(s <= 0 for s in std):
        raise VisionFTError(f"std {list(std)} must be positive; fix data.std")


def build_transforms(
    augment: list[dict[str, Any]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline (augment + Normalize + ToTensorV2) or, with train=False, evaluation
    pipeline (Normalize + ToTensorV2). Output: float32 tensor C x H x W.

    Pixels are divided by 255, then standardised with `mean` and `std` (given on the 0..1
    scale, like timm's data config). `seed` fixes the augmentation random state; data loader
    workers re-seed it per worker (see `vision_ft.data.loaders`).
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    _check_normalisation(mean, std)
    steps = _build_steps(augment) if train else []
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps, seed=seed)
