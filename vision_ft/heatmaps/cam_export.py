"""The optional class-activation-map output of an exported CNN classifier, and its check
against torch (the same rule as the logits: fp32 differences scaled to the values' size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vision_ft.config import Config
from vision_ft.data.decode import load_image
from vision_ft.data.pixel_policy import policy_from_metadata
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError
from vision_ft.heatmaps.cam import CAM_OUTPUT, CamClassifier, has_linear_cam
from vision_ft.onnx_metadata import ModelMetadata
from vision_ft.runtime import open_session


def cam_classifier_for(model: nn.Module, config: Config) -> CamClassifier | None:
    """A CamClassifier around `model` when export.cam is on and its head allows exact CAMs."""
    if not config.export.cam or not has_linear_cam(model, config.data.channels, config.data.image_size):
        return None
    return CamClassifier(model).eval()


@torch.no_grad()
def check_cam_export(cam_model: nn.Module, onnx_path: Path, images: list[Path], metadata: ModelMetadata,
                     tolerance: float) -> float:
    """Largest |onnxruntime - torch| class-activation-map difference; raises past the tolerance."""
    transform = build_transforms([], metadata.mean, metadata.std, train=False)
    size = tuple(metadata.input_size)
    pixels = policy_from_metadata(metadata)
    batch = torch.stack([transform(image=load_image(p, metadata.channels, size, pixels=pixels))["image"] for p in images])
    expected = cam_model(batch)[1].numpy()
    # The model's own input, so this compares the graphs; the logits check covers preprocessing.
    got = open_session(onnx_path).run([CAM_OUTPUT], {metadata.input_name: batch.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    allowed = tolerance * max(1.0, float(np.abs(expected).max()) / 10.0)
    if diff > allowed:
        raise VisionFTError(f"export check failed: onnxruntime and torch class activation maps differ by up to {diff:.2e} "
                            f"(allowed {allowed:.1e}); no model written. Export without them with --set export.cam=false")
    return diff
