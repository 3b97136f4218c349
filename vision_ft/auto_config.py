"""Resolving every `auto` setting of a config from the data, before the run folder is written.

The run folder's config.yaml then holds plain numbers (what `eval`, `predict`, `export` and
`--resume` rebuild the model from), and each choice is returned with its reason in words for
the log and the report.
"""

from __future__ import annotations

import math

from vision_ft.auto_size import choose_image_size
from vision_ft.budget import BUDGET_MAX_FACTOR, auto_epochs
from vision_ft.config import Config
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import class_counts
from vision_ft.imbalance import choose_balance
from vision_ft.lr_defaults import default_lr

# Early-stopping patience: a quarter of the planned epochs, at least 3 (an EMA'd, smoothly
# decaying run improves in small steps; 5 of 10 epochs cut runs off while still improving).
MIN_PATIENCE = 3


def auto_patience(epochs: int) -> int:
    return max(MIN_PATIENCE, math.ceil(epochs / 4))


def auto_metric(num_classes: int) -> str:
    """AUROC for two classes, the validation loss otherwise: both move smoothly with the
    weights, unlike accuracy or macro-F1 at a fixed threshold on a small validation split."""
    return "auroc" if num_classes == 2 else "loss"


def steps_per_epoch(train_images: int, batch_size: int, processes: int) -> int:
    per_process = train_images // max(1, processes)
    return max(1, per_process // batch_size if per_process >= batch_size else 1)


def resolve_auto(config: Config, splits: dict[str, list[Sample]], class_names: list[str],
                 processes: int = 1) -> tuple[Config, list[str]]:
    """A copy of `config` with no `auto` left, and one sentence per choice made."""
    resolved = config.model_copy(deep=True)
    notes: list[str] = []
    data, train = resolved.data, resolved.train
    if data.image_size == "auto":
        paths = [s.path for name in ("train", "val") for s in splits.get(name, [])]
        choice = choose_image_size(paths, resolved.model.name, seed=data.split_seed)
        data.image_size = choice.size
        notes.append(f"data.image_size {choice.reason}")
    mode, why = choose_balance(data.balance, class_counts(splits["train"], len(class_names)), class_names)
    data.balance = mode
    notes.append(f"data.balance {mode}: {why}")
    if train.lr == "auto":
        train.lr = default_lr(resolved.finetune.strategy, train.batch_size, processes)
        notes.append(f"train.lr {train.lr:.2g}: the {resolved.finetune.strategy} strategy's rate at batch "
                     f"{train.batch_size * processes}")
    if train.epochs == "auto":
        steps = steps_per_epoch(len(splits["train"]), train.batch_size, processes)
        epochs = auto_epochs(steps)
        if train.time_budget:
            epochs *= BUDGET_MAX_FACTOR
            notes.append(f"train.epochs at most {epochs} ({BUDGET_MAX_FACTOR}x the auto epochs); the time budget "
                         f"{train.time_budget} sets the number once the first steps are timed")
        else:
            notes.append(f"train.epochs {epochs}: {steps} steps an epoch, about {epochs * steps} optimizer steps")
        train.epochs = epochs
    stopping = train.early_stopping
    if stopping.metric == "auto":
        stopping.metric = auto_metric(len(class_names))
        notes.append(f"selection by val {stopping.metric} ({len(class_names)} classes)")
    if stopping.patience == "auto" and not train.time_budget:  # with a budget: once the epochs are planned
        stopping.patience = auto_patience(train.epochs)
        notes.append(f"early-stopping patience {stopping.patience} epochs (a quarter of {train.epochs})")
    return resolved, notes
