"""`train.memory_format`: the layout of the model's 4-D weights (and so of its activations).

Channels-last (NHWC) lets oneDNN run convolutions without converting layouts around them. On
CPU it trained 1.3-1.4x faster per step for EfficientNet-B0, MobileNetV3, RegNetY and DenseNet
and 1.45x for EfficientNet-Lite0 (2-core x86 CPU, batch 32, 128-224 px), and it was never
slower beyond noise (ResNet, ConvNeXt, ViT: 0.99-1.06x at 128 px): `auto` picks it on CPU. On
CUDA `auto` keeps the contiguous (NCHW) layout the Triton LoRA kernel is written for.

Only the model is converted: a convolution with channels-last weights returns channels-last
outputs for NCHW inputs too, so the data pipeline stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def resolve_memory_format(setting: str, device: torch.device) -> str:
    """'channels_last' or 'contiguous' for the `train.memory_format` setting on `device`."""
    if setting != "auto":
        return setting
    return "channels_last" if device.type == "cpu" else "contiguous"


def apply_memory_format(model: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """`model` with its 4-D parameters and buffers in the resolved layout (in place)."""
    return model.to(memory_format=FORMATS[resolve_memory_format(setting, device)])
