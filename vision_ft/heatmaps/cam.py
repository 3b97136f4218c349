"""Class activation maps (Zhou et al. 2016) of CNN classifiers whose head is global average
pooling + a linear layer: map_k(x, y) = w_k . f(x, y), the class weights applied at each location
of the last feature map. Averaged over the locations (plus the bias) it is exactly the logit, so
the map shows how much each region contributed to the decision.

`CamClassifier` returns logits and maps from one forward pass and exports to ONNX as a second
output, so an application draws the heatmap without torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CAM_OUTPUT = "cam"
# Relative agreement required between the logits and the maps' spatial means: fp32 sums in a
# different order differ by ~1e-6; a head that is not pooling + linear differs by O(1).
_CAM_IDENTITY_TOLERANCE = 1e-3


def linear_classifier(model: nn.Module) -> nn.Linear | None:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


@torch.no_grad()
def has_linear_cam(model: nn.Module, channels: int, image_size: int) -> bool:
    """True when logits = linear(mean over locations of forward_features): then CAMs are exact.

    Checked numerically on a random image rather than by class name: it holds for ResNet,
    EfficientNet, RegNet, DenseNet; not for MobileNetV3 (a conv after the pooling), ConvNeXt (a
    norm after the pooling) or ViTs (tokens, not a feature map)."""
    head = linear_classifier(model)
    if head is None or not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        return False
    was_training = model.training
    model.eval()
    try:
        image = torch.randn(1, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        features = model.forward_features(image.to(device))
        if features.dim() != 4 or features.shape[1] != head.in_features:
            return False
        logits = model.forward_head(features)
        cam = F.conv2d(features, head.weight[:, :, None, None]).mean((2, 3))
        if head.bias is not None:
            cam = cam + head.bias
        scale = max(1.0, float(logits.abs().max()))
        return float((cam - logits).abs().max()) <= _CAM_IDENTITY_TOLERANCE * scale
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        model.train(was_training)


class CamClassifier(nn.Module):
    """`model` returning (logits N x K, class activation maps N x K x h x w)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = linear_classifier(model)
        if head is None:
            raise ValueError("CamClassifier needs a model with a linear classifier")
        self.model = model
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(images)
        logits = self.model.forward_head(features)
        # A 1x1 convolution with the class weights: one product per location and class.
        maps = F.conv2d(features, self.head.weight[:, :, None, None])
        return logits, maps
