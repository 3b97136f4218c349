"""A wall-clock budget for a training run: how many epochs fit, and when to stop.

`train.time_budget: 10m` starts the clock when training is asked for. The planner times the
first optimizer steps, estimates what one epoch costs (training steps plus the validation
pass) and what the end of the run costs (the final val/test evaluation and the ONNX export),
and sets the number of epochs so that all of it ends inside the budget. After the first and the
second epoch the plan is redone from the measured epoch (up or down), and before each epoch the
loop asks whether another one still fits.

Without a budget, `train.epochs: auto` scales with the dataset: enough optimizer steps for small
datasets, few epochs for large ones (`auto_epochs`).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vision_ft.config import FinetuneConfig

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")

# Training images `train.epochs: auto` aims to show: about 800 steps of batch 32 (25,600 images)
# fine-tune a pretrained backbone on a few thousand images; datasets with many images need fewer
# passes. Counted in images, so the epochs do not depend on the batch. Clamped to 5..60 epochs.
AUTO_TARGET_IMAGES = 25_600
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 5, 60
# A budget never plans more than this many times the auto epochs: past that, early stopping
# ends the run anyway and the cosine schedule would stay near its peak for nothing.
BUDGET_MAX_FACTOR = 3
# A forward pass costs about a third of a training step (forward + backward + optimizer).
EVAL_COST_PER_IMAGE = 0.35
# onnx export, graph check and the onnxruntime comparison: ~15 s for EfficientNet-Lite0 on 2 cores.
EXPORT_SECONDS = 20.0
# Steps left out of the timing: the first ones start the loader workers and fill the allocator.
WARMUP_STEPS = 2
TIMED_STEPS = 8
# Epochs whose measured duration re-plans the run: the first (it also pays for starting the
# loader workers and warming the allocator, and on ELPV it took 48 s against 37 s for each later
# one, which left a fifth of a 9-minute budget unused) and the second, the first at steady
# state. Later epochs only make the "another epoch fits" check more cautious: re-planning late
# would bend the learning-rate schedule near its end.
REPLAN_EPOCHS = (1, 2)


def parse_duration(text: str | float | int) -> float:
    """Seconds in "10m", "90s", "1h30m", "1.5h" or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match or not any(match.groups()):
            raise ValueError(f"'{text}' is not a duration; write e.g. 10m, 90s, 1h30m")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ValueError(f"'{text}' must be a positive duration, e.g. 10m")
    return seconds


def auto_epochs(steps_per_epoch: int, batch_size: int) -> int:
    """Epochs for `train.epochs: auto`: about AUTO_TARGET_IMAGES training images shown, within 5..60."""
    wanted = math.ceil(AUTO_TARGET_IMAGES / max(1, steps_per_epoch * batch_size))
    return max(AUTO_MIN_EPOCHS, min(AUTO_MAX_EPOCHS, wanted))


@dataclass
class BudgetPlanner:
    """Plans epochs to fit `budget_s` seconds counted from `started` (time.monotonic())."""

    budget_s: float
    steps_per_epoch: int
    batch_size: int
    val_images: int
    test_images: int
    max_epochs: int
    evals_per_epoch: int = 1  # 2 when the weight average is evaluated too
    tta_factor: int = 1  # the views test-time augmentation averages (eval.tta): up to 4
    export: bool = True
    patience_auto: bool = False  # early-stopping patience follows the planned epochs
    started: float = field(default_factory=time.monotonic)
    step_seconds: float | None = None
    epoch_seconds: float | None = None
    eval_seconds_per_image: float | None = None  # measured on the validation passes
    _step_times: list[float] = field(default_factory=list)
    _eval_times: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def record_step(self) -> bool:
        """Call after every optimizer step of the first epoch; True once the step time is known."""
        if self.step_seconds is not None:
            return False
        self._step_times.append(time.monotonic())
        timed = min(TIMED_STEPS, max(1, self.steps_per_epoch - WARMUP_STEPS - 1))
        if len(self._step_times) < WARMUP_STEPS + 1 + timed:
            return False
        times = self._step_times[WARMUP_STEPS:]
        self.step_seconds = (times[-1] - times[0]) / (len(times) - 1)
        return True

    def record_epoch(self, epoch: int, seconds: float) -> bool:
        """Feed an epoch's duration (training and validation); True when the epochs should be
        re-planned from it."""
        if epoch in REPLAN_EPOCHS:
            self.epoch_seconds = seconds
            return True
        self.epoch_seconds = max(self.epoch_seconds or 0.0, seconds)
        return False

    def elapsed_in_first_epoch(self) -> float:
        """Time of the first epoch's steps so far (they are paid for by what has elapsed)."""
        return len(self._step_times) * (self.step_seconds or 0.0)

    def record_eval(self, seconds: float, images: int) -> None:
        """Feed a validation pass; the end of the run is costed from the median pass so far, so one
        pass slowed by another process does not claim minutes of the budget (ELPV: one 66 s epoch
        under a concurrent job priced the end at 197 s instead of 49 s and stopped the run at 6 of 10
        epochs with 253 s left)."""
        if images > 0:
            self._eval_times.append(seconds / images)
            self.eval_seconds_per_image = statistics.median(self._eval_times)

    def _eval_seconds(self, images: int) -> float:
        per_image = self.eval_seconds_per_image
        if per_image is None:
            per_image = (self.step_seconds or 0.0) / self.batch_size * EVAL_COST_PER_IMAGE
        return images * per_image

    def estimated_epoch_seconds(self) -> float:
        if self.epoch_seconds is not None:
            return self.epoch_seconds
        train = self.steps_per_epoch * (self.step_seconds or 0.0)
        return train + self.evals_per_epoch * self._eval_seconds(self.val_images)

    def final_seconds(self) -> float:
        """The end of the run: best checkpoint on val and test, then export and its check on val."""
        seconds = self.tta_factor * self._eval_seconds(self.val_images + self.test_images)
        if self.export:
            seconds += EXPORT_SECONDS + self._eval_seconds(self.val_images)
        return seconds

    def plan(self, epochs_done: int, time_in_current_epoch: float = 0.0) -> int:
        """Total epochs that fit: the ones done, plus whole epochs in what is left after the end's cost."""
        per_epoch = max(1e-6, self.estimated_epoch_seconds())
        # The current epoch, if one is running, is paid for already in part.
        left = self.remaining() - self.final_seconds() + time_in_current_epoch
        fitting = int(left // per_epoch)
        return max(1, min(self.max_epochs, epochs_done + max(0, fitting)))

    def steps_that_fit(self) -> int | None:
        """Optimizer steps of the running first epoch that still fit (with its validation pass and
        the end of the run), when the whole epoch does not; None when it does. A dataset too large
        for one epoch in the budget trains on part of an epoch instead of overrunning."""
        if self.step_seconds is None or self.step_seconds <= 0:
            return None
        left = self.remaining() - self.final_seconds() - self.evals_per_epoch * self._eval_seconds(self.val_images)
        done = len(self._step_times)
        fitting = done + max(0, int(left // self.step_seconds))
        return fitting if fitting < self.steps_per_epoch else None

    def another_epoch_fits(self) -> bool:
        return self.remaining() >= self.estimated_epoch_seconds() + self.final_seconds()

    def describe(self, epochs: int) -> str:
        return (f"time budget {self.budget_s:.0f} s: {self.step_seconds or 0:.2f} s a step, ~{self.estimated_epoch_seconds():.0f} s "
                f"an epoch with validation, ~{self.final_seconds():.0f} s for the final evaluation and export "
                f"-> {epochs} epochs ({self.elapsed():.0f} s used so far)")


# A budget that buys fewer epochs than this at the data's size trains at a smaller size instead:
# the ELPV recipe that scored 85.5-86.4 % ran 8 epochs at 160 px; 3 epochs at 224 px were not
# enough to converge from ImageNet weights.
MIN_BUDGET_EPOCHS = 8
PROBE_STEPS = 3
# Images per probe step: the step time of CNNs on a CPU grows about linearly with the batch, so
# a quarter of the batch costs a quarter of the probe's time. Not exactly: at 192-224 px a batch
# of 8 stays in the CPU's caches where 32 do not (tf_efficientnet_lite0, 2 threads: 1.15 s against
# 1.51 s a step at 192 px, scaled to 32 images), so the probe that decides the size runs up to
# DECIDING_PROBE_BATCH images, the batch training will run.
PROBE_BATCH = 8
DECIDING_PROBE_BATCH = 32


def probe_step_seconds(model_name: str, num_classes: int, channels: int, image_size: int, batch_size: int,
                       device: torch.device, memory_format: str = "auto", probe_batch: int = PROBE_BATCH,
                       finetune: FinetuneConfig | None = None, amp_dtype: torch.dtype | None = None) -> float:
    """Seconds of one training step (forward, backward, optimizer) of `batch_size` images: the median
    of PROBE_STEPS steps on a random batch of at most `probe_batch`, scaled, after one untimed step,
    in the weights' layout training uses (`train.memory_format`); random weights cost the same
    arithmetic as pretrained ones.

    With `finetune`, the step is the strategy's (what trains, frozen BatchNorm folded): a linear
    probe or LoRA step costs a fraction of a full one. Progressive unfreezing is timed as full
    fine-tuning, which its last epochs are. With `amp_dtype`, forward and loss run under autocast to it,
    as training runs them."""
    import contextlib

    import torch
    from torch import nn

    from vision_ft.finetune.build import build_strategy
    from vision_ft.memory_format import apply_memory_format
    from vision_ft.models.create import create_model

    model = create_model(model_name, num_classes=num_classes, in_chans=channels, weights="none",
                         image_size=image_size)
    if finetune is not None and finetune.strategy != "progressive":
        strategy = build_strategy(finetune)
        strategy.prepare(model)
        strategy.set_train_mode(model)
    else:
        model.train()
    model.to(device)
    apply_memory_format(model, memory_format, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    probe_batch = min(batch_size, probe_batch)
    images = torch.randn(probe_batch, channels, image_size, image_size, device=device)
    labels = torch.randint(0, num_classes, (probe_batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(PROBE_STEPS + 1):
        started = time.monotonic()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            loss = loss_fn(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.monotonic() - started)
    # The median, not the mean: one step slowed by another process must not shrink the run's image size.
    return statistics.median(times[1:]) * batch_size / probe_batch


def size_for_budget(size: int, step_seconds: float, steps_per_epoch: int, budget_s: float, stride: int,
                    min_size: int, max_size: int | None = None) -> int:
    """The largest size (a multiple of `stride`, between `min_size` and `max_size`, which defaults to
    `size`) at which MIN_BUDGET_EPOCHS fit the budget, from a step's time measured at `size` and
    taking a step's time as proportional to the pixel count."""
    max_size = max_size or size
    # Validation, the final evaluation and export take about a quarter of a budget on top of the steps.
    epochs = 0.75 * budget_s / max(1e-9, step_seconds * steps_per_epoch)
    wanted = size * math.sqrt(epochs / MIN_BUDGET_EPOCHS)
    if wanted >= max_size:
        return max_size
    return max(min_size, int(wanted // stride) * stride)
