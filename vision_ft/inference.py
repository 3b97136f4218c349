"""Batched torch inference over a dataset: the one loop behind validation, `eval` and `predict`.

`infer` returns raw logits (and the loader's labels), so whatever turns logits into an answer
(softmax here; calibration, sigmoid for multi-label, identity for regression elsewhere) builds
on the same pass over the data. `eval_loader` makes the evaluation pipeline (decode, resize,
normalise; no augmentation) every caller shares.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vision_ft.config import Config
from vision_ft.data.dataset import ImageDataset
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.pixel_policy import policy_from_config
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import TrainingDiverged
from vision_ft.metrics import compute_metrics
from vision_ft.tta import average_views, logits_of_views, views_of


@dataclass(frozen=True)
class Outputs:
    """What a model said about every sample of a loader, in loader order."""

    logits: np.ndarray  # N x classes, float32
    labels: np.ndarray  # N, the loader's labels (0 where the data has none)

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits, float32 (torch's softmax: the numbers training has always logged)."""
        return torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()


def eval_loader(samples: list[Sample], config: Config, mean: list[float], std: list[float],
                batch_size: int | None = None, workers: int | None = None, skip_bad: bool = False,
                cache_bytes: int = 0) -> Iterable[Any]:
    """A loader over `samples` through the evaluation pipeline of `config`, in sample order
    (`cache_bytes`: see ImageDataset, for a loader read every epoch)."""
    data = config.data
    dataset = ImageDataset(samples, build_transforms([], mean, std, train=False), data.channels, data.image_size,
                           skip_bad=skip_bad, max_pixels=data.max_pixels, pixels=policy_from_config(data),
                           cache_bytes=cache_bytes)
    return build_loader(dataset, batch_size or config.train.batch_size, train=False,
                        workers=data.workers if workers is None else workers)


def infer(model: nn.Module, loader: Iterable[Any], device: torch.device | None = None,
          amp_dtype: torch.dtype | None = None, progress: str | None = None, tta: str = "none") -> Outputs:
    """Logits and labels for every batch of `loader`, with the model in eval mode.

    `device` defaults to the model's; `amp_dtype` runs the forward under autocast (logits come
    back in float32 either way); `progress` names a tqdm bar shown on an interactive terminal;
    `tta` averages the logits of the mirrored views that eval.tta names (`vision_ft.tta`).
    """
    per_view, labels = infer_views(model, loader, views_of(tta), device, amp_dtype, progress)
    return Outputs(average_views(per_view, tta), labels)


@torch.no_grad()
def infer_views(model: nn.Module, loader: Iterable[Any], views: Sequence[str], device: torch.device | None = None,
                amp_dtype: torch.dtype | None = None, progress: str | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`infer` for several views in one pass over the data: each view's logits, and the labels."""
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    batches = tqdm(loader, desc=progress, leave=False, disable=progress is None or not sys.stderr.isatty())
    logits: dict[str, list[torch.Tensor]] = {view: [] for view in views}
    all_labels = []
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        with autocast:
            for view, view_logits in logits_of_views(model, images, views).items():
                logits[view].append(view_logits.cpu())
        all_labels.append(torch.as_tensor(labels))
    if not all_labels:
        return {view: np.zeros((0, 0), dtype=np.float32) for view in views}, np.zeros(0, dtype=np.int64)
    return ({view: torch.cat(chunks).numpy() for view, chunks in logits.items()},
            torch.cat(all_labels).numpy())


def evaluate_probs(probs: np.ndarray, labels: np.ndarray, class_names: list[str], label_smoothing: float = 0.0) -> dict[str, Any]:
    """Metrics plus the mean (label-smoothed) cross-entropy, from predicted probabilities."""
    if not np.isfinite(probs).all():
        raise TrainingDiverged("the model's outputs are NaN or infinite: its weights diverged; "
                               "train again with a lower train.lr (or keep train.grad_clip set)")
    metrics = compute_metrics(labels, probs, class_names)
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    nll = -logp[np.arange(len(labels)), labels]
    smooth = -logp.mean(axis=1)
    metrics["loss"] = float(((1 - label_smoothing) * nll + label_smoothing * smooth).mean())
    return metrics


def evaluate_outputs(outputs: Outputs, class_names: list[str], label_smoothing: float = 0.0) -> dict[str, Any]:
    """`evaluate_probs` on the softmax of `outputs`."""
    return evaluate_probs(outputs.probabilities, outputs.labels, class_names, label_smoothing)
