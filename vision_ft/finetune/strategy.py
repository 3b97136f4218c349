"""The interface between the training loop and a fine-tuning strategy.

A strategy decides which parameters train, in which optimizer groups and at which learning
rates, and may change that at epoch boundaries (progressive unfreezing). The loop never
touches requires_grad itself.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vision_ft.config import FinetuneConfig


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation scales are not regularised: decaying them hurts accuracy.
    return param.ndim <= 1 or name.endswith(".bias")


def decay_split_groups(named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two optimizer groups (with and without weight decay) for the given trainable parameters."""
    decay = [p for n, p in named_params if p.requires_grad and not is_no_decay(n, p)]
    no_decay = [p for n, p in named_params if p.requires_grad and is_no_decay(n, p)]
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd, "start_step": 0, **extra})
    return groups


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Strategy:
    """Full fine-tuning: every parameter trains at the base learning rate."""

    name = "full"

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config

    def prepare(self, model: nn.Module) -> None:
        """Set the initial trainable set (before the optimizer is built)."""
        for param in model.parameters():
            param.requires_grad_(True)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups for the parameters that train now. Each carries `base_lr` and
        `start_step` so the schedule can warm up groups that join later."""
        return decay_split_groups(list(model.named_parameters()), lr, weight_decay)

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: Any, step: int, lr: float, weight_decay: float) -> bool:
        """Adjust the trainable set for `epoch`; return True when it changed (DDP must re-wrap)."""
        return False

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode, honouring the strategy's BatchNorm policy."""
        model.train()

    def describe(self, model: nn.Module) -> str:
        """One log line: what trains this epoch."""
        return f"strategy {self.name}: {count_trainable(model):,} trainable parameters"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
