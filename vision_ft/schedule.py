"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` of the base rate.

Each optimizer group keeps its own `base_lr` (layer-wise decay) and `start_step`; a group that
joins mid-run (progressive unfreezing) gets its own short warmup from its start step, so a
freshly unfrozen block is not hit with the full rate at once.
"""

from __future__ import annotations

import math

import torch


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the base rate at `step` (0-based) for the whole run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_learning_rates(
    optimizer: torch.optim.Optimizer,
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    group_warmup_steps: int,
) -> None:
    """Set every group's lr for `step`."""
    run_factor = cosine_factor(step, total_steps, warmup_steps, min_ratio)
    for group in optimizer.param_groups:
        since_join = step - group.get("start_step", 0)
        join_factor = 1.0
        if group.get("start_step", 0) > 0 and group_warmup_steps > 0:
            join_factor = min(1.0, (since_join + 1) / group_warmup_steps)
        group["lr"] = group["base_lr"] * run_factor * join_factor
