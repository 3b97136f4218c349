"""Patch features of a frozen timm CNN: mid-level feature maps, each location averaged over its
neighbourhood, deeper maps upsampled to the finest one, channels pooled to a fixed size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_ft.errors import VisionFTError

if TYPE_CHECKING:
    from vision_ft.config import Config

# Mid-level features: generic enough to transfer from ImageNet, local enough to place a defect
# (PatchCore uses the second and third ResNet stages, strides 8 and 16).
DEFAULT_REDUCTIONS = (8, 16)


def pick_layers(model: nn.Module, layers: list[int] | None, name: str) -> list[int]:
    """The feature levels to use: `layers` as given (checked), else those at strides 8 and 16."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info or not isinstance(info, list):
        raise VisionFTError(f"backbone '{name}' does not expose feature maps to timm's forward_intermediates; "
                            "anomaly detection needs a CNN backbone such as resnet18 or tf_efficientnet_lite0")
    reductions = [int(level["reduction"]) for level in info]
    if layers is None:
        picked = [reductions.index(r) for r in DEFAULT_REDUCTIONS if r in reductions]
        if len(picked) < 2 or len(set(reductions)) < 3:
            raise VisionFTError(f"backbone '{name}' has no feature maps at strides 8 and 16 (strides {reductions}); "
                                "anomaly detection needs a CNN backbone, or set anomaly.layers explicitly")
        return picked
    bad = [i for i in layers if not 0 <= i < len(reductions)]
    if bad or not layers:
        raise VisionFTError(f"anomaly.layers {layers} must be feature levels of '{name}' in 0..{len(reductions) - 1} "
                            f"(strides {reductions})")
    return sorted(set(layers))


def channel_pooling_matrix(channels: int, size: int) -> torch.Tensor:
    """A channels x size matrix averaging consecutive channel groups (adaptive average pooling
    over the channel axis as one matrix product, which ONNX exports as a MatMul)."""
    matrix = np.zeros((channels, size), dtype=np.float32)
    for out in range(size):
        start, stop = (out * channels) // size, -((-(out + 1) * channels) // size)
        matrix[start:stop, out] = 1.0 / (stop - start)
    return torch.from_numpy(matrix)


class PatchFeatureExtractor(nn.Module):
    """images (N x C x H x W) -> patch features (N x h*w x D) on the finest chosen feature grid."""

    def __init__(self, backbone: nn.Module, layers: list[int], patch_size: int, feature_dim: int, channels: int,
                 image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.patch_size = patch_size
        total = sum(int(backbone.feature_info[i]["num_chs"]) for i in self.layers)
        self.feature_dim = min(feature_dim, total)
        pooling = channel_pooling_matrix(total, self.feature_dim) if total > feature_dim else None
        self.register_buffer("pooling", pooling if pooling is not None else torch.zeros(0), persistent=False)
        self.backbone.eval()
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        with torch.no_grad():
            probe = self.feature_maps(torch.zeros(1, channels, image_size, image_size))
        self.grid = tuple(int(v) for v in probe.shape[-2:])

    def train(self, mode: bool = True) -> "PatchFeatureExtractor":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its pretrained statistics
        return self

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(images, indices=self.layers, intermediates_only=True)
        pad = self.patch_size // 2
        # Local aggregation: each location sees its neighbourhood, so a feature describes a patch.
        pooled = [F.avg_pool2d(m, self.patch_size, stride=1, padding=pad, count_include_pad=False)
                  if self.patch_size > 1 else m for m in maps]
        size = pooled[0].shape[-2:]
        aligned = [pooled[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in pooled[1:]]
        return torch.cat(aligned, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.feature_maps(images).flatten(2).transpose(1, 2)
        if self.pooling.numel():
            features = features @ self.pooling
        return features


def build_extractor(config: Config, weights: str | None = None) -> PatchFeatureExtractor:
    """The frozen patch-feature extractor the config describes; weights as for training
    ('hub', 'none' or a file), or `weights` when given (a fitted model is rebuilt with 'none')."""
    from vision_ft.models.create import create_model

    name = config.model.name
    # The classifier is built the way training builds it, so --weights behaves the same; its
    # head and the stages after the last chosen level are then dropped.
    model = create_model(name, num_classes=2, in_chans=config.data.channels,
                         weights=config.model.weights if weights is None else weights)
    layers = pick_layers(model, config.anomaly.layers, name)
    model.prune_intermediate_layers(layers, prune_norm=True, prune_head=True)
    return PatchFeatureExtractor(model, layers, config.anomaly.patch_size, config.anomaly.feature_dim,
                                 config.data.channels, config.data.image_size)
