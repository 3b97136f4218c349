"""Our fine-tuning strategies inside someone else's training loop.

    from vision_ft.finetune import prepare
    groups, schedule = prepare(model, strategy="progressive", lr=1e-3, unfreeze_every=2, lr_decay=0.7)
    optimizer = torch.optim.AdamW(groups)
    for epoch in range(1, epochs + 1):
        schedule.on_epoch_start(epoch, optimizer)   # unfreezes groups on schedule, adds them to the optimizer
        schedule.train_mode()                        # model.train(), frozen BatchNorm statistics stay fixed
        ...                                          # your batches

The same Strategy objects drive `vision-ft train`; settings are the `finetune.*` config keys and
are validated like them (one-line errors naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vision_ft.config import validate_config
from vision_ft.finetune.build import build_strategy
from vision_ft.finetune.strategy import Strategy
from vision_ft.schedule import apply_learning_rates


@dataclass
class FinetuneSchedule:
    """What `prepare` hands back besides the parameter groups: the strategy's epoch hook."""

    model: nn.Module
    strategy: Strategy
    lr: float
    weight_decay: float
    step: int = field(default=0)  # optimizer steps so far; groups that join later warm up from here

    def on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the schedule for `epoch` (1-based): unfreeze the groups due and add their parameter
        groups to `optimizer`. Returns True when the trainable set changed (re-wrap DDP then)."""
        return self.strategy.on_epoch_start(epoch, self.model, optimizer, self.step, self.lr, self.weight_decay)

    def train_mode(self) -> None:
        """model.train(), except that norm layers of frozen groups keep their running statistics
        (finetune.frozen_bn='freeze')."""
        self.strategy.set_train_mode(self.model)

    def set_learning_rates(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                           min_ratio: float = 0.01, group_warmup_steps: int = 0) -> None:
        """Optional: vision-ft's schedule for the current step (warmup, cosine to lr x min_ratio,
        layer-wise rates, a short warmup for groups that joined later), then count the step.
        Call it once per batch before optimizer.step(); a torch LR scheduler does not know about
        groups added mid-run."""
        apply_learning_rates(optimizer, self.step, total_steps, warmup_steps, min_ratio, group_warmup_steps)
        self.step += 1

    def describe(self) -> str:
        """One line: which groups train, how many parameters, the schedule's next step."""
        return self.strategy.describe(self.model)


def prepare(
    model: nn.Module,
    strategy: str = "progressive",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    **settings: Any,
) -> tuple[list[dict[str, Any]], FinetuneSchedule]:
    """Set `model`'s initial trainable set for `strategy` and return (optimizer parameter groups,
    schedule). Groups run head first with layer-wise rates (`lr_decay`) and no weight decay on
    biases and norms; pass them to any torch optimizer.

    `settings` are `finetune.*` keys: freeze_groups, unfreeze_every, unfreeze_at, lr_decay,
    frozen_bn, lora={"r": 8, "targets": [...]}, ... (see configs/default.yaml).

    Raises:
        VisionFTError: an unknown strategy or setting, or one that does not fit the model.
    """
    finetune = validate_config({"finetune": {"strategy": strategy, **settings}}, "finetune.prepare").finetune
    chosen = build_strategy(finetune)
    chosen.prepare(model)
    groups = chosen.param_groups(model, lr, weight_decay)
    return groups, FinetuneSchedule(model, chosen, lr, weight_decay)
