"""Rebuilding a trained model from its run folder (for eval, predict, export and resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vision_ft.checkpoint import load_model_weights, recover_checkpoints
from vision_ft.config import Config, load_config
from vision_ft.data.split import load_split
from vision_ft.finetune.build import build_strategy
from vision_ft.models.create import create_model, pretrained_normalisation
from vision_ft.errors import VisionFTError
from vision_ft.memory_format import apply_memory_format
from vision_ft.run_folder import RunFolder, open_run_folder
from vision_ft.run_lock import tidy_if_idle
from vision_ft.tasks import build_task
from vision_ft.tasks.base import Task


@dataclass
class LoadedRun:
    run: RunFolder
    config: Config
    class_names: list[str]
    model: nn.Module
    mean: list[float]
    std: list[float]
    task: Task  # with its state (thresholds, target statistics) from the run folder


def normalisation(config: Config, model: nn.Module) -> tuple[list[float], list[float]]:
    """The config's mean/std when set, else the backbone's pretraining values, sized to the channels."""
    mean, std = pretrained_normalisation(model)
    mean = config.data.mean or mean
    std = config.data.std or std
    channels = config.data.channels
    if len(mean) != channels:
        # One grey channel stands for the average of the RGB channels it was made from.
        mean = [sum(mean) / len(mean)] * channels
        std = [sum(std) / len(std)] * channels
    return list(mean), list(std)


def build_model(config: Config, num_classes: int, weights: str | None = None) -> nn.Module:
    """The backbone with its new head, as the config describes (weights from the config unless given)."""
    return create_model(
        config.model.name,
        num_classes=num_classes,
        in_chans=config.data.channels,
        weights=config.model.weights if weights is None else weights,
        drop_rate=config.model.drop_rate,
        image_size=config.data.image_size if isinstance(config.data.image_size, int) else None,
    )


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(path: Path, checkpoint: str = "best", device: torch.device | str = "cpu") -> LoadedRun:
    """The run's model with the weights of its `best` or `last` checkpoint, in eval mode on `device`."""
    run = open_run_folder(path)
    # Leftovers of a crashed save are tidied here too, unless a training process owns the folder.
    tidy_if_idle(run.root, lambda: recover_checkpoints(run.checkpoints))
    config = load_config(run.config)
    if config.task == "anomaly":
        raise VisionFTError(f"{path} is an anomaly run; this command works on classifier runs "
                            "(anomaly runs: train, eval, predict, export)")
    class_names, splits = load_split(run.split)
    task = build_task(config, class_names)
    task.fit(splits.get("train", []))  # task.json, when present, overrides what this recomputes
    task.load(run.root)
    # The checkpoint holds every weight, so no pretrained download is needed here.
    model = build_model(config, len(class_names), weights="none")
    # Only the architecture: LoRA runs get their adapter modules. What would train is training's business.
    build_strategy(config.finetune).adapt(model)
    load_model_weights(run.best if checkpoint == "best" else run.last, model)
    model.eval().to(device)
    apply_memory_format(model, config.train.memory_format, torch.device(device))
    mean, std = normalisation(config, model)
    return LoadedRun(run, config, class_names, model, mean, std, task)


def is_anomaly_run(path: Path) -> bool:
    """True for a run folder written by `vision-ft train --task anomaly`."""
    run = open_run_folder(path)
    return load_config(run.config).task == "anomaly"
