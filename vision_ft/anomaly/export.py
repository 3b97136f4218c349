"""ONNX export of an anomaly run: backbone, memory bank (a constant) and nearest-neighbour
distances in one graph with two outputs, `score` (N) and `anomaly_map` (N x H x W), both
normalised so that 0.5 is the threshold. Verified against torch like every export: onnxruntime
(runtime preprocessing) and torch (training evaluation pipeline) score the run's validation
images, and the file is only written when scores and maps agree."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

import vision_ft
from vision_ft.anomaly.decision import is_defective
from vision_ft.anomaly.model_file import load_anomaly_run
from vision_ft.anomaly.runtime import MAP_OUTPUT, TASK, OnnxAnomalyDetector
from vision_ft.data.decode import load_image
from vision_ft.data.pixel_policy import policy_from_config, policy_from_metadata
from vision_ft.data.split import load_split, split_fingerprint
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.export import (
    OPSET,
    ExportResult,
    Verification,
    _check_destination,
    partial_path,
    save_checked,
    to_onnx,
    verification_images,
)
from vision_ft.onnx_metadata import ModelMetadata, write_metadata
from vision_ft.run_folder import open_run_folder
from vision_ft.runtime import open_session

# Scores and maps are sigmoid outputs in (0, 1). fp32 reordering (Conv+BN folding, other GEMM
# blocking) moved them by up to ~1e-5 in our runs; 1e-3 still catches a wrong layer or bank.
SCORE_TOLERANCE = 1e-3

log = logging.getLogger("vision_ft")


@dataclass(frozen=True)
class MapCheck:
    max_score_diff: float
    max_map_diff: float
    label_agreement: float  # fraction of images on the same side of the threshold


def _metadata(loaded) -> ModelMetadata:  # noqa: ANN001 - LoadedAnomalyRun
    cfg = loaded.config
    _, splits = load_split(loaded.run.split)
    threshold = loaded.state["threshold"]
    return ModelMetadata(
        class_names=["good", "defective"], input_size=[cfg.data.image_size, cfg.data.image_size],
        channels=cfg.data.channels, mean=[float(v) for v in loaded.mean], std=[float(v) for v in loaded.std],
        backbone=cfg.model.name, vision_ft_version=vision_ft.__version__, split_fingerprint=split_fingerprint(splits),
        finetune_strategy="frozen", output_name="score", task="anomaly", **policy_from_config(cfg.data).settings(),
        extra={"task": TASK, "map_output": MAP_OUTPUT, "uncertain_band": cfg.anomaly.uncertain_band,
               "good_class": cfg.anomaly.good_class, "threshold_raw": threshold["raw"],
               "threshold_scale": threshold["scale"], "threshold_rule": threshold["rule"],
               "bank_size": int(loaded.scorer.bank.shape[0])},
    )


def _describe(metadata: ModelMetadata) -> str:
    return (f"{metadata.backbone} PatchCore-style anomaly model: outputs score (N) and anomaly_map (N x H x W), "
            "normalised so 0.5 is the threshold; preprocessing in the vision_ft.* metadata")


@torch.no_grad()
def torch_scores(scorer: torch.nn.Module, images: list[Path], metadata: ModelMetadata) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of the torch model through the training evaluation pipeline."""
    transform = build_transforms([], metadata.mean, metadata.std, train=False)
    size = tuple(metadata.input_size)
    pixels = policy_from_metadata(metadata)
    batch = torch.stack([transform(image=load_image(p, metadata.channels, size, pixels=pixels))["image"] for p in images])
    scores, maps = scorer(batch)
    return scores.numpy(), maps.numpy()


def verify_anomaly(scorer: torch.nn.Module, onnx_path: Path, images: list[Path]) -> MapCheck:
    """Largest |onnxruntime - torch| of the scores and the maps on `images` (and the first alone)."""
    session = open_session(onnx_path)
    metadata = ModelMetadata.from_properties(session.get_modelmeta().custom_metadata_map, str(onnx_path))
    runtime = OnnxAnomalyDetector(session, metadata, str(onnx_path))
    expected_scores, expected_maps = torch_scores(scorer, images, metadata)
    got_scores, got_maps = runtime.score_maps(runtime.preprocess(images))
    one_score, one_map = runtime.score_maps(runtime.preprocess(images[:1]))
    return MapCheck(
        max(float(np.abs(got_scores - expected_scores).max()), float(np.abs(one_score[0] - expected_scores[0]))),
        max(float(np.abs(got_maps - expected_maps).max()), float(np.abs(one_map[0] - expected_maps[0]).max())),
        float((is_defective(got_scores) == is_defective(expected_scores)).mean()),
    )


def export_anomaly_run(run_dir: Path, out: Path | None = None, force: bool = False, tolerance: float = SCORE_TOLERANCE,
                       opset: int = OPSET, echo: Callable[[str], None] = log.info) -> ExportResult:
    """Export an anomaly run to a verified ONNX file (default RUN/model.onnx); see the module docstring."""
    started = time.perf_counter()
    out = Path(out) if out is not None else open_run_folder(run_dir).onnx
    _check_destination(out, force)
    loaded = load_anomaly_run(run_dir)
    split_name, images = verification_images(load_split(loaded.run.split)[1])
    scorer = loaded.scorer.float().eval()
    metadata = _metadata(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    try:
        proto = to_onnx(scorer, metadata.channels, tuple(metadata.input_size), opset, output_names=("score", MAP_OUTPUT))
        write_metadata(proto, metadata, _describe(metadata))
        proto.producer_name, proto.producer_version = "vision-ft", vision_ft.__version__
        save_checked(proto, partial)
        check = verify_anomaly(scorer, partial, images)
        echo(f"onnxruntime vs torch on {len(images)} {split_name} images: max |score diff| {check.max_score_diff:.2e}, "
             f"max |map diff| {check.max_map_diff:.2e} (allowed {tolerance:.1e})")
        worst = max(check.max_score_diff, check.max_map_diff)
        if worst > tolerance:
            raise VisionFTError(f"export check failed: onnxruntime and torch anomaly scores or maps differ by up to "
                                f"{worst:.2e} (allowed {tolerance:.1e}); no model written. Report it with the backbone "
                                f"name ({metadata.backbone}), or accept it with --tolerance")
        metadata = replace(metadata, verified_max_abs_diff=worst)
        write_metadata(proto, metadata, _describe(metadata))
        onnx.save(proto, str(partial))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    verification = Verification(len(images), check.max_score_diff, tolerance, check.label_agreement)
    return ExportResult(out, verification, metadata, time.perf_counter() - started)
