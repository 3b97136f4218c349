"""Resolving every `auto` setting of a config from the data, before the run folder is written.

The run folder's config.yaml then holds plain numbers (what `eval`, `predict`, `export` and
`--resume` rebuild the model from), and each choice is returned with its reason in words for
the log and the report.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vision_ft.auto_size import choose_image_size
from vision_ft.budget import (BUDGET_MAX_FACTOR, DECIDING_PROBE_BATCH, MIN_BUDGET_EPOCHS, PROBE_BATCH, auto_epochs,
                              parse_duration, probe_step_seconds, size_for_budget)
from vision_ft.config import Config
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import class_counts
from vision_ft.errors import VisionFTError
from vision_ft.imbalance import choose_balance
from vision_ft.lr_defaults import default_lr
from vision_ft.precision import autocast_dtype, choose_amp

if TYPE_CHECKING:
    import torch

# Early-stopping patience: a quarter of the planned epochs, at least 3 (an EMA'd, smoothly
# decaying run improves in small steps; 5 of 10 epochs cut runs off while still improving).
# Under a time budget, half: the user gave that time, and the cosine schedule's low-rate end
# often brings the best epoch (ELPV binary at 128 px, 12 epochs planned: best val ROC-AUC 0.921 at
# epoch 4, patience 3 stopped the run at epoch 7; trained on, epoch 8 reached 0.927).
MIN_PATIENCE = 3


def auto_patience(epochs: int, budgeted: bool = False) -> int:
    return max(MIN_PATIENCE, math.ceil(epochs / (2 if budgeted else 4)))


# Selection metrics of the tasks whose choice does not depend on the data: smooth ones again.
TASK_METRICS = {"multilabel": "macro_auroc", "regression": "rmse"}


def auto_metric(num_classes: int) -> str:
    """AUROC for two classes, the validation loss otherwise: both move smoothly with the
    weights, unlike accuracy or macro-F1 at a fixed threshold on a small validation split."""
    return "auroc" if num_classes == 2 else "loss"


def steps_per_epoch(train_images: int, batch_size: int, processes: int) -> int:
    per_process = train_images // max(1, processes)
    return max(1, per_process // batch_size if per_process >= batch_size else 1)


def _fit_size_to_budget(config: Config, train_images: int, num_classes: int, processes: int,
                        step_seconds: float | None = None) -> list[str]:
    """Shrink an auto image size when the budget would buy fewer than MIN_BUDGET_EPOCHS epochs at it.

    A step's time is not exactly proportional to the pixel count (fixed per-step costs, caches),
    and one probe can be slowed by another process, so the size the first, small-batch probe
    points to is timed again on the training batch (up to DECIDING_PROBE_BATCH images) and that
    measurement decides; a larger size is taken only when its own timing fits. At most three
    probes (2-10 s each on a 2-core CPU), counted in the budget. `step_seconds`, a step already timed at
    the data's size on the training batch (by the precision choice), replaces the first probe."""
    from vision_ft.auto_size import MIN_SIZE, backbone_geometry
    from vision_ft.run_model import default_device

    _, stride, _ = backbone_geometry(config.model.name)
    size = config.data.image_size
    if size <= MIN_SIZE:
        return []
    budget_s = parse_duration(config.train.time_budget)
    steps = steps_per_epoch(train_images, config.train.batch_size, processes)
    timed: list[tuple[int, float]] = []  # (size, seconds) in the order probed, for the note
    deciding: dict[int, float] = {}  # sizes timed on the training batch

    def probe(at: int, probe_batch: int) -> float:
        seconds = probe_step_seconds(config.model.name, num_classes, config.data.channels, at, config.train.batch_size,
                                     default_device(), config.train.memory_format, probe_batch, config.finetune,
                                     autocast_dtype(config.train.amp))
        timed.append((at, seconds))
        return seconds

    def fits_at(at: int, seconds: float) -> int:
        return size_for_budget(at, seconds, steps, budget_s, stride, MIN_SIZE, max_size=size)

    def fitting_size(at: int) -> int:
        if at not in deciding:
            deciding[at] = probe(at, DECIDING_PROBE_BATCH)
        return fits_at(at, deciding[at])

    if step_seconds is not None:
        timed.append((size, step_seconds))
        deciding[size] = step_seconds
        chosen = fitting_size(size)
    else:
        chosen = fits_at(size, probe(size, PROBE_BATCH))  # a cheap first look
    if chosen == size:
        return []
    second = fitting_size(chosen)
    # A larger size is taken only when its own timing on the training batch fits: the first,
    # small-batch probe alone never decides (ELPV, batch 16: it read 0.96 s at 224 px, where
    # training then ran 0.43-0.49 s a step).
    if second < chosen or (second > chosen and fitting_size(second) >= second):
        chosen = second
    if chosen == size:
        return []
    config.data.image_size = chosen
    steps_timed = ", ".join(f"{seconds:.2f} s at {at} px" for at, seconds in timed)
    return [f"data.image_size {chosen} px instead of {size} px: a {config.finetune.strategy} step took {steps_timed}, so the "
            f"{config.train.time_budget} budget buys {MIN_BUDGET_EPOCHS} epochs of {steps} steps at {chosen} px, "
            f"not at {size} px"]


def _choose_precision(config: Config, num_classes: int) -> tuple[str, float | None]:
    """`train.amp` auto: on a CPU with bfloat16 instructions, the faster of float32 and bfloat16
    autocast for one training step of this run (model, strategy, size, batch, layout). Returns the
    note and, when it was timed, the step's seconds in the chosen precision at the data's size."""
    from vision_ft.run_model import default_device

    device = default_device()
    timed: dict[torch.dtype | None, float] = {}

    def time_step(dtype: torch.dtype | None) -> float:
        seconds = probe_step_seconds(config.model.name, num_classes, config.data.channels, config.data.image_size,
                                     config.train.batch_size, device, config.train.memory_format, DECIDING_PROBE_BATCH,
                                     config.finetune, dtype)
        timed[dtype] = min(seconds, timed.get(dtype, seconds))  # a precision timed twice: its faster reading
        return seconds

    config.train.amp, why = choose_amp(device, time_step, timed=bool(config.train.time_budget))
    return f"train.amp {config.train.amp}: {why}", timed.get(autocast_dtype(config.train.amp))


def resolve_auto(config: Config, splits: dict[str, list[Sample]], class_names: list[str],
                 processes: int = 1) -> tuple[Config, list[str]]:
    """A copy of `config` with no `auto` left, and one sentence per choice made."""
    resolved = config.model_copy(deep=True)
    notes: list[str] = []
    data, train = resolved.data, resolved.train
    if train.memory_format == "auto":
        from vision_ft.memory_format import choose_memory_format
        from vision_ft.run_model import default_device

        train.memory_format, why = choose_memory_format(default_device())
        notes.append(f"train.memory_format {train.memory_format}: {why}")
    size_is_auto = data.image_size == "auto"
    if size_is_auto:
        paths = [s.path for name in ("train", "val") for s in splits.get(name, [])]
        choice = choose_image_size(paths, resolved.model.name, seed=data.split_seed)
        data.image_size = choice.size
        notes.append(f"data.image_size {choice.reason}")
    step_seconds = None  # a training step at the data's size, when the precision choice timed one
    if train.amp == "auto":  # timed at the data's size; the budget's size probes then run in this precision
        note, step_seconds = _choose_precision(resolved, len(class_names))
        notes.append(note)
    if size_is_auto and train.time_budget:
        notes += _fit_size_to_budget(resolved, len(splits["train"]), len(class_names), processes, step_seconds)
    if resolved.task == "classification":
        mode, why = choose_balance(data.balance, class_counts(splits["train"], len(class_names)), class_names)
        data.balance = mode
        notes.append(f"data.balance {mode}: {why}")
    elif data.balance in ("loss_weights", "sampler"):
        hint = " (use train.pos_weight=auto for rare labels)" if resolved.task == "multilabel" else ""
        raise VisionFTError(f"data.balance={data.balance} weighs classes, and a {resolved.task} run has none{hint}; "
                            "set data.balance=none")
    else:
        data.balance = "none"
    if train.lr == "auto":
        train.lr = default_lr(resolved.finetune.strategy, train.batch_size, processes)
        notes.append(f"train.lr {train.lr:.2g}: the {resolved.finetune.strategy} strategy's rate at batch "
                     f"{train.batch_size * processes}")
    if train.epochs == "auto":
        steps = steps_per_epoch(len(splits["train"]), train.batch_size, processes)
        epochs = auto_epochs(steps, train.batch_size * processes)
        if train.time_budget:
            epochs *= BUDGET_MAX_FACTOR
            notes.append(f"train.epochs at most {epochs} ({BUDGET_MAX_FACTOR}x the auto epochs); the time budget "
                         f"{train.time_budget} sets the number once the first steps are timed")
        else:
            notes.append(f"train.epochs {epochs}: {steps} steps an epoch, about {epochs * steps} optimizer steps "
                         f"of {train.batch_size * processes} images")
        train.epochs = epochs
    stopping = train.early_stopping
    if stopping.metric == "auto":
        stopping.metric = TASK_METRICS.get(resolved.task) or auto_metric(len(class_names))
        reason = f"{len(class_names)} classes" if resolved.task == "classification" else f"the {resolved.task} task's"
        notes.append(f"selection by val {stopping.metric} ({reason})")
    if stopping.patience == "auto" and not train.time_budget:  # with a budget: once the epochs are planned
        stopping.patience = auto_patience(train.epochs)
        notes.append(f"early-stopping patience {stopping.patience} epochs (a quarter of {train.epochs})")
    return resolved, notes
