"""An exponential moving average of the weights, evaluated beside the trained model.

On a small validation split the weights of one epoch can look better or worse by chance; the
average of the last few hundred steps is smoother and usually generalises better. timm's
ModelEmaV3 keeps it; its warmup makes the decay grow with the step count (1 - (1 + step)^-2/3),
so short runs average over about the last epoch instead of starting from the pretrained weights.
"""

from __future__ import annotations

import torch
from torch import nn

# The decay's ceiling: an average over about the last 5,000 steps on long runs.
MAX_DECAY = 0.9998


class WeightAverage:
    """The average model (`.module`, in eval mode) and its update after each optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self._ema = ModelEmaV3(model, decay=MAX_DECAY, use_warmup=True)
        self._ema.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self._ema.update(model, step=step)

    def decay(self, step: int) -> float:
        return float(self._ema.get_decay(step))
