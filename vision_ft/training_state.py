"""What a training run knows between epochs, typed, and its form in a checkpoint's state.json.

`TrainingState.to_dict()` writes the keys state.json has always had (epoch, step, best_score,
best_epoch, bad_epochs, history, stopped_early, strategy), so older run folders resume and
newer ones stay readable by older code; keys it does not know (those of later versions) are
carried along untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingState:
    epoch: int = 0  # last finished epoch (1-based; 0 before the first)
    step: int = 0  # optimizer steps taken so far
    best_score: float | None = None  # best validation score of the early-stopping metric
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs in a row without improvement
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl rows
    stopped_early: bool = False
    strategy: dict[str, Any] = field(default_factory=dict)  # Strategy.state_dict()
    extra: dict[str, Any] = field(default_factory=dict)  # state.json keys this version does not use

    _KEYS = ("epoch", "step", "best_score", "best_epoch", "bad_epochs", "history", "stopped_early", "strategy")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to state.json."""
        return {**{key: getattr(self, key) for key in self._KEYS}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        """Read a state.json of this or an earlier version (missing keys take their defaults)."""
        known = {key: data[key] for key in cls._KEYS if key in data}
        # The optimizer's part belongs to the checkpoint it came with (`load_optimizer_state`);
        # carried along it would reappear, stale, in the next best checkpoint.
        extra = {key: value for key, value in data.items() if key not in (*cls._KEYS, "optimizer")}
        state = cls(**known, extra=extra)
        state.stopped_early = bool(state.stopped_early)
        return state

    def record_epoch(self, epoch: int, score: float | None, metric: str, patience: int, last_epoch: int) -> bool:
        """Count `epoch` with its validation `score`; True when it is the best so far.

        Lower is better for the loss and errors (LOWER_IS_BETTER), higher for the others; a missing or NaN score
        never improves, except in the first epoch, which is always the best so far. Sets
        `stopped_early` once `patience` epochs passed without improvement before `last_epoch`.
        """
        # The first epoch is the best so far even when its score is undefined (e.g. AUROC on a
        # validation split of one class): the run always has a best checkpoint to evaluate.
        improved = is_better(score, self.best_score, metric) or self.best_epoch == 0
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch
        self.stopped_early = self.should_stop(patience) and epoch < last_epoch
        return improved

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without improvement."""
        return self.bad_epochs >= patience


# Metrics where lower is better (the loss; regression errors); higher is better for the rest.
LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae"})


def is_better(score: float | None, best: float | None, metric: str) -> bool:
    """Whether `score` beats `best` for `metric` (lower loss or error, higher anything else)."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return False
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    return score < best if metric in LOWER_IS_BETTER else score > best
