"""The learning-rate range test: train briefly while the rate grows exponentially, watch the loss.

The rate rises from `start_lr` to `end_lr` over `steps` optimizer steps on the training split
(the model, strategy, augmentation and batch size the config describes); the loss is smoothed
with an exponential average and the test stops once it exceeds four times its minimum. The
suggestion is the rate where the smoothed loss falls fastest, taken before its minimum (the
minimum itself is already too hot to train at). Nothing is written but the plot.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vision_ft.config import Config
from vision_ft.errors import VisionFTError

log = logging.getLogger("vision_ft")

SMOOTHING = 0.9  # weight of the running loss average (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss passes this multiple of its minimum


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float
    plot: Path | None


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The rate of the steepest descent of the smoothed loss against log(rate), before its minimum."""
    if len(lrs) < 3:
        raise VisionFTError(f"the range test stopped after {len(lrs)} steps; give it more --steps or a lower --start-lr")
    lowest = int(np.argmin(losses))
    if lowest < 2:  # the loss only rose: the range starts too high
        return lrs[0]
    slopes = np.gradient(np.asarray(losses[: lowest + 1]), np.log(np.asarray(lrs[: lowest + 1])))
    return float(lrs[int(np.argmin(slopes))])


def lr_range_test(config: Config, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 1.0,
                  plot: Path | None = None) -> LRFindResult:
    """Run the range test for `config` (its `auto` settings resolved as training would)."""
    if not 0 < start_lr < end_lr:
        raise VisionFTError(f"the range test needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 5:
        raise VisionFTError(f"--steps {steps} is too few for a range test; use 50 or more")
    model, loader, loss_fn, optimizer, device = _build(config)
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    running, best = 0.0, math.inf
    batches = iter(loader)
    for step in range(steps):
        lr = start_lr * factor ** step
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("base_lr", 1.0)  # keeps layer-wise decay ratios
        try:
            images, labels = next(batches)
        except StopIteration:  # small datasets: go round again
            batches = iter(loader)
            images, labels = next(batches)
        loss = loss_fn(model(images.to(device)).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.item())
        if not math.isfinite(value):
            break
        running = SMOOTHING * running + (1 - SMOOTHING) * value
        smoothed = running / (1 - SMOOTHING ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > DIVERGED * best:
            break
    suggestion = suggest_lr(lrs, losses)
    if plot is not None:
        _plot(lrs, losses, suggestion, plot)
    return LRFindResult(lrs, losses, suggestion, plot)


def _build(config: Config) -> tuple[nn.Module, object, nn.Module, torch.optim.Optimizer, torch.device]:
    """The model, training loader, loss and optimizer that training would build for `config`."""
    from vision_ft.auto_config import resolve_auto
    from vision_ft.data.dataset import ImageDataset
    from vision_ft.data.loaders import build_loader
    from vision_ft.data.transforms import build_transforms
    from vision_ft.finetune.build import build_strategy
    from vision_ft.run_model import build_model, default_device, normalisation
    from vision_ft.train import _check_data_and_split, build_optimizer

    class_names, splits, _ = _check_data_and_split(config)
    config, _ = resolve_auto(config, splits, class_names)
    device = default_device()
    model = build_model(config, len(class_names))
    strategy = build_strategy(config.finetune)
    strategy.prepare(model)
    model.to(device)
    strategy.set_train_mode(model)
    mean, std = normalisation(config, model)
    data = config.data
    dataset = ImageDataset(splits["train"], build_transforms(data.augment.train, mean, std, train=True),
                           data.channels, data.image_size, skip_bad=data.skip_bad_images)
    loader = build_loader(dataset, config.train.batch_size, train=True, workers=data.workers,
                          balanced=data.balance == "sampler", seed=config.train.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
    optimizer = build_optimizer(strategy.param_groups(model, 1.0, config.train.weight_decay), 1.0,
                                config.train.weight_decay, device)
    return model, loader, loss_fn, optimizer, device


def _plot(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    from vision_ft.plots import plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
