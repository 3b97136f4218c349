"""Hooks into the training loop, for code that watches a run without changing it.

The loop calls every callback on the main process only: `on_epoch_end` after each epoch's
metrics row is written and its checkpoints saved, `on_train_end` after the best checkpoint was
evaluated, and `close` whatever happened (also after an error or Ctrl-C). Experiment logs
(TensorBoard, MLflow) and the hyperparameter search's pruning are callbacks. A callback may
raise to stop the run (the search prunes a trial that way); the run folder keeps its last
checkpoint.
"""

from __future__ import annotations

from typing import Any


class TrainingCallback:
    """Override the hooks you need; the defaults do nothing."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any], learning_rates: dict[str, float]) -> None:
        """`row` is the epoch's metrics.jsonl line (train_loss, val_* metrics, lr, seconds);
        `learning_rates` holds the rate of each layer group (head first) at the epoch's last step."""

    def on_train_end(self, metrics: dict[str, Any]) -> None:
        """`metrics` is metrics.json: {"val": {...}, "test": {...}, "best_epoch": n}."""

    def close(self) -> None:
        """Release files or connections; called once, after success or failure."""


def group_learning_rates(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """{layer group name: lr} of an optimizer's groups; a layer group's decay and no-decay halves
    share one rate, so each name appears once."""
    rates: dict[str, float] = {}
    for index, group in enumerate(param_groups):
        rates.setdefault(str(group.get("layer_group", f"group{index}")), float(group["lr"]))
    return rates
