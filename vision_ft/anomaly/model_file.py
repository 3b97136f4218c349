"""The fitted anomaly model in a run folder: `checkpoints/best/model.safetensors` (frozen
backbone, memory bank, support sets, threshold and scale) and `state.json` (how it was fitted)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vision_ft.anomaly.features import build_extractor
from vision_ft.anomaly.scorer import AnomalyScorer
from vision_ft.checkpoint import MODEL_FILE, load_model_weights, load_state
from vision_ft.config import Config, load_config
from vision_ft.data.split import load_split
from vision_ft.errors import VisionFTError
from vision_ft.run_folder import RunFolder, open_run_folder
from vision_ft.run_model import normalisation


@dataclass
class LoadedAnomalyRun:
    run: RunFolder
    config: Config
    class_names: list[str]  # the data's classes (good + defect classes)
    scorer: AnomalyScorer
    mean: list[float]
    std: list[float]
    state: dict[str, Any]


def bank_shapes(folder: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the saved memory bank and support sets, read without loading the tensors."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise VisionFTError(f"checkpoint {folder} has no {MODEL_FILE}; was the run folder copied completely?")
    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice("bank").get_shape()), tuple(handle.get_slice("support").get_shape())


def load_anomaly_run(path: Path, device: torch.device | str = "cpu") -> LoadedAnomalyRun:
    """The fitted anomaly model of a run folder, in eval mode on `device`."""
    run = open_run_folder(path)
    config = load_config(run.config)
    if config.task != "anomaly":
        raise VisionFTError(f"{path} is a {config.task} run, not an anomaly run")
    class_names, _ = load_split(run.split)
    state = load_state(run.best)
    bank_shape, support_shape = bank_shapes(run.best)
    extractor = build_extractor(config, weights="none")  # every weight comes from the checkpoint
    scorer = AnomalyScorer(extractor, torch.zeros(bank_shape), torch.zeros(support_shape, dtype=torch.long),
                           config.data.image_size, config.anomaly.blur_sigma)
    load_model_weights(run.best, scorer)
    scorer.eval().to(device)
    mean, std = normalisation(config, extractor.backbone)
    return LoadedAnomalyRun(run, config, class_names, scorer, mean, std, state)


