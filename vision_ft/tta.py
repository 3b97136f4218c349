"""Test-time augmentation (eval.tta): which mirrored views of an image are averaged, and
whether they are worth it for a run.

A model trained with random mirrors has learnt that a mirrored image means the same; averaging
its logits over those mirrors at evaluation smooths out its remaining asymmetries. `auto` (the
default) takes the mirrors the training augmentation applied, and keeps them only when they
improve the validation selection metric over the plain image: on ELPV solar cells (mirrored in
training) the four mirror views raised validation ROC-AUC in each of 8 runs and test accuracy
from 0.868 to 0.879 on average; on chest X-rays (not mirror-symmetric) they lowered both, and
validation said so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vision_ft.training_state import is_better

# Each setting's views: "h" mirrors left-right, "v" top-bottom, "hv" both (a 180-degree turn).
VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flip": ("identity", "h"),
    "vflip": ("identity", "v"),
    "flip_hv": ("identity", "h", "v", "hv"),
}

# albumentations transforms that mirror an image, and the mirrors they include.
_MIRRORING = {
    "HorizontalFlip": {"h"},
    "VerticalFlip": {"v"},
    "D4": {"h", "v"},
    "SquareSymmetry": {"h", "v"},
}


def views_of(tta: str) -> tuple[str, ...]:
    """The views eval.tta averages; `auto` not yet resolved (a run that never reached its final
    evaluation) predicts on the plain image."""
    return VIEWS.get(tta, VIEWS["none"])


def apply_view(images: Tensor, view: str) -> Tensor:
    """`images` (N, C, H, W) as seen through `view`."""
    if view == "identity":
        return images
    dims = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}[view]
    return images.flip(dims)


def mirrors_in_augmentation(augment: Sequence[dict[str, Any]]) -> str:
    """The eval.tta setting that matches the mirrors in a training augmentation list ('none'
    when it mirrors nothing)."""
    mirrors: set[str] = set()
    for transform in augment:
        if transform.get("p", 0.5) > 0:
            mirrors |= _MIRRORING.get(str(transform.get("name")), set())
    if mirrors == {"h", "v"}:
        return "flip_hv"
    return {frozenset({"h"}): "flip", frozenset({"v"}): "vflip"}.get(frozenset(mirrors), "none")


def views_to_compute(tta: str, augment: Sequence[dict[str, Any]]) -> str:
    """The setting whose views a final evaluation computes: `auto`'s candidate (the augmentation's
    mirrors, still to be compared with the plain image), else `tta` itself."""
    return mirrors_in_augmentation(augment) if tta == "auto" else tta


def average_views(logits_per_view: dict[str, np.ndarray], tta: str) -> np.ndarray:
    """The mean of the logits of the views `tta` averages (the plain image's own array for one view)."""
    views = views_of(tta)
    if len(views) == 1:
        return logits_per_view[views[0]]
    return np.mean([logits_per_view[view] for view in views], axis=0).astype(np.float32)


def choose_tta(candidate: str, logits_per_view: dict[str, np.ndarray],
               score: Callable[[np.ndarray], float], metric: str) -> tuple[str, float, float]:
    """`candidate` when its averaged validation logits score better on `metric` than the plain
    image's, else 'none' (also on a tie, or when the metric is undefined, e.g. AUROC on a one-class
    validation split: NaN). Returns (choice, the plain image's score, the candidate's score)."""
    plain = score(average_views(logits_per_view, "none"))
    averaged = score(average_views(logits_per_view, candidate))
    return (candidate if is_better(averaged, plain, metric) else "none"), plain, averaged


def logits_of_views(model: torch.nn.Module, images: Tensor, views: Sequence[str]) -> dict[str, Tensor]:
    """The model's float32 logits for every view of a batch."""
    return {view: model(apply_view(images, view)).float() for view in views}


class MirroredViews(torch.nn.Module):
    """`model` averaged over the views of an eval.tta setting, as one module: what ONNX export
    bakes in, so the exported model predicts what the run's evaluation measured. Map outputs
    (4-D, e.g. class activation maps) are mirrored back before they are averaged."""

    def __init__(self, model: torch.nn.Module, tta: str) -> None:
        super().__init__()
        self.model, self.views = model, views_of(tta)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = [self.model(apply_view(images, view)) for view in self.views]
        if isinstance(outputs[0], Tensor):
            return torch.stack(outputs).mean(0)
        return tuple(torch.stack([apply_view(out[i], view) if out[i].dim() == 4 else out[i]
                                  for out, view in zip(outputs, self.views)]).mean(0)
                     for i in range(len(outputs[0])))


def with_views(model: torch.nn.Module, tta: str) -> torch.nn.Module:
    """`model` itself for a single view, else wrapped in MirroredViews."""
    return model if len(views_of(tta)) == 1 else MirroredViews(model, tta).eval()
