"""`train.memory_format`: the layout of the model's 4-D weights (and so of its activations).

Channels-last (NHWC) lets oneDNN run convolutions without converting layouts around them. On a
2-core x86 CPU (batch 32, 128 px, benchmarks/memory_format.py) a full fine-tuning step was 1.4x
faster for EfficientNet-Lite0, EfficientNet-B0 and MobileNetV3, 1.1-1.2x for ResNet-18/50, RegNetY,
DenseNet and ConvNeXt, and unchanged for ViT; a LoRA step (`--strategy lora`) 1.52x faster for
Lite0, 1.24-1.34x for EfficientNet-B0 and MobileNetV3, 1.13-1.14x for ResNet-18/50, unchanged for
ConvNeXt and ViT: `auto` picks it on CPU for every strategy. On CUDA `auto` keeps the contiguous
layout the Triton LoRA kernel is written for.

Only the model is converted: a convolution with channels-last weights returns channels-last
outputs for NCHW inputs too, so the data pipeline stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def choose_memory_format(device: torch.device) -> tuple[str, str]:
    """(layout, reason) that `auto` picks on `device`, the same for every finetune.strategy."""
    if device.type != "cpu":
        return "contiguous", f"the layout the kernels expect on {device.type}"
    return "channels_last", "the faster layout for convolutions on cpu, for every strategy"


def resolve_memory_format(setting: str, device: torch.device) -> str:
    """'channels_last' or 'contiguous' for the `train.memory_format` setting on `device`."""
    return setting if setting != "auto" else choose_memory_format(device)[0]


def apply_memory_format(model: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """`model` with its 4-D parameters and buffers in the resolved layout (in place)."""
    return model.to(memory_format=FORMATS[resolve_memory_format(setting, device)])
