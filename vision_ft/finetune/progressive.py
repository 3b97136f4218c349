"""Progressive unfreezing: the head trains first, then layer groups join top-down on a schedule.

Epoch 1 trains the head alone. With `unfreeze_every: 2` the group below the head joins at
epoch 3, the next at epoch 5, ...; with `unfreeze_at: [2, 4, 7]` they join at those epochs and
no further. `freeze_groups` keeps that many groups at the stem frozen throughout.

A group that joins gets its own optimizer groups at its layer-wise learning rate, with
`start_step` set to the current step so `schedule.py` warms it up over `group_warmup_epochs`.
The strategy's state (how many groups train and the step each joined) is saved with every
checkpoint, so a resumed run rebuilds exactly the optimizer groups it had, in the same order,
before the saved optimizer state is loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vision_ft.config import FinetuneConfig
from vision_ft.errors import VisionFTError
from vision_ft.finetune.layer_groups import LayerGroup, layer_groups
from vision_ft.finetune.strategy import Strategy, check_freeze_groups, model_label


def check_unfreeze_at(unfreeze_at: list[int] | None) -> None:
    """`unfreeze_at` epochs must be at least 2 (epoch 1 trains the head alone) and strictly increasing."""
    if unfreeze_at is None:
        return
    if not unfreeze_at:
        raise VisionFTError("finetune.unfreeze_at=[] unfreezes nothing; list epochs such as [2, 4, 7], "
                            "or set it to null and use finetune.unfreeze_every")
    if unfreeze_at[0] < 2:
        raise VisionFTError(f"finetune.unfreeze_at={unfreeze_at} starts at epoch {unfreeze_at[0]}, but epoch 1 trains "
                            "the head alone; start at 2 or later")
    for before, after in zip(unfreeze_at, unfreeze_at[1:]):
        if after <= before:
            raise VisionFTError(f"finetune.unfreeze_at={unfreeze_at} is not increasing ({after} follows {before}); "
                                "list each epoch once, in order, e.g. [2, 4, 7]")


def unfreeze_epochs(config: FinetuneConfig, groups_to_unfreeze: int) -> list[int]:
    """The epoch at which each group below the head joins, top-down."""
    if config.unfreeze_at is not None:
        return list(config.unfreeze_at)
    every = config.unfreeze_every or 1
    return [1 + every * k for k in range(1, groups_to_unfreeze + 1)]


def groups_training_at(config: FinetuneConfig, epoch: int, groups_to_unfreeze: int) -> int:
    """How many groups (the head included) train in `epoch` (1-based)."""
    return 1 + sum(1 for start in unfreeze_epochs(config, groups_to_unfreeze) if start <= epoch)


class ProgressiveStrategy(Strategy):
    """Head first, then one more layer group (top-down) at each scheduled epoch."""

    name = "progressive"

    def __init__(self, config: FinetuneConfig) -> None:
        super().__init__(config)
        if config.unfreeze_at is None and config.unfreeze_every is None:
            raise VisionFTError("strategy 'progressive' needs finetune.unfreeze_every (e.g. 2) or "
                                "finetune.unfreeze_at (e.g. [2, 4, 7]); both are null")
        check_unfreeze_at(config.unfreeze_at)
        # start_steps[d]: the step at which the group d places below the head joined (d = 0: the head).
        self.start_steps: list[int] = [0]
        self.epoch = 1

    def unfreezable(self, groups: list[LayerGroup]) -> int:
        """Number of groups below the head that the schedule may unfreeze."""
        return len(groups) - 1 - self.config.freeze_groups

    def check(self, groups: list[LayerGroup], model: nn.Module) -> None:
        check_freeze_groups(self.config.freeze_groups, groups, model)
        available = self.unfreezable(groups)
        if available < 1:
            raise VisionFTError(
                f"finetune.freeze_groups={self.config.freeze_groups} leaves no group of {model_label(model)} below "
                f"the head to unfreeze; set it to at most {len(groups) - 2} or use strategy 'linear_probe'")
        planned = self.config.unfreeze_at
        if planned is not None and len(planned) > available:
            frozen = f" (finetune.freeze_groups={self.config.freeze_groups} of them stay frozen)" if self.config.freeze_groups else ""
            raise VisionFTError(
                f"finetune.unfreeze_at={planned} lists {len(planned)} epochs but {model_label(model)} has only "
                f"{available} groups below its head to unfreeze{frozen}; list at most {available} epochs")

    def trainable_groups(self, groups: list[LayerGroup], epoch: int) -> list[int]:
        count = groups_training_at(self.config, epoch, self.unfreezable(groups))
        return self._top_groups(groups, count)

    @staticmethod
    def _top_groups(groups: list[LayerGroup], count: int) -> list[int]:
        """Indices of the `count` groups nearest the head (the head included), head first."""
        return [groups[-1 - depth].index for depth in range(count)]

    def start_step(self, group: LayerGroup, groups: list[LayerGroup]) -> int:
        depth = groups[-1].index - group.index
        return self.start_steps[depth] if depth < len(self.start_steps) else 0

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: Any, step: int, lr: float, weight_decay: float) -> bool:
        """Unfreeze the groups scheduled up to `epoch`; each joins the optimizer at `step`."""
        self.epoch = epoch
        groups = layer_groups(model)
        joining = self.trainable_groups(groups, epoch)[len(self.start_steps):]
        if not joining:
            return False
        self.set_trainable(model, epoch)
        for index in joining:
            self.start_steps.append(step)
            for optimizer_group in self.optimizer_groups(model, groups[index], groups, lr, weight_decay, step):
                optimizer.add_param_group(optimizer_group)
        return True

    def describe(self, model: nn.Module) -> str:
        groups = layer_groups(model)
        line = super().describe(model)
        pending = [(epoch, depth) for depth, epoch in enumerate(unfreeze_epochs(self.config, self.unfreezable(groups)), 1)
                   if depth >= len(self.start_steps) and epoch > self.epoch]
        if pending:
            epoch, depth = pending[0]
            return f"{line}; next: {groups[-1 - depth].name} at epoch {epoch}"
        return f"{line}; schedule complete"

    def state_dict(self) -> dict[str, Any]:
        return {"start_steps": list(self.start_steps), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "start_steps" in state:
            self.start_steps = [int(step) for step in state["start_steps"]]
            self.epoch = int(state.get("epoch", 1))
