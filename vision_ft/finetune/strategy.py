"""The interface between the training loop and a fine-tuning strategy, and the fixed strategies.

A strategy has two halves. `adapt(model)` changes the architecture (LoRA injects adapters); a
run loaded for eval, predict or export gets only that. `set_trainable(model, epoch)` decides
which parameters train; with `param_groups` (optimizer groups and learning rates) and
`on_epoch_start` (progressive unfreezing) it is what training adds. The loop never touches
requires_grad itself.

Every strategy works on the model's layer groups (`layer_groups.py`, stem first, head last)
and builds its optimizer groups head first, top-down, one pair (with / without weight decay)
per layer group, so layer-wise learning-rate decay works the same for all of them:
the head trains at lr, the group below at lr * lr_decay, the next at lr * lr_decay**2, ...

Here: `Strategy` (full fine-tuning, the base), `LinearProbeStrategy` and `PartialStrategy`.
Progressive unfreezing and LoRA live in `progressive.py` and `lora_strategy.py`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vision_ft.config import FinetuneConfig
from vision_ft.errors import VisionFTError
from vision_ft.finetune.freezing import frozen_norm_layers, set_trainable_groups, train_mode_with_frozen_bn
from vision_ft.finetune.layer_groups import LayerGroup, layer_groups
from vision_ft.finetune.norm_folding import fold_norms_into


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation scales are not regularised: decaying them hurts accuracy.
    return param.ndim <= 1 or name.endswith(".bias")


def decay_split_groups(named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two optimizer groups (with and without weight decay) for the given trainable parameters.

    `extra` (e.g. `start_step`, `name`) is copied into both groups.
    """
    decay = [p for n, p in named_params if p.requires_grad and not is_no_decay(n, p)]
    no_decay = [p for n, p in named_params if p.requires_grad and is_no_decay(n, p)]
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd, "start_step": 0, **extra})
    return groups


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_label(model: nn.Module) -> str:
    """The timm architecture name ('resnet18') for messages, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def trainable_summary(model: nn.Module) -> str:
    """'8,394,754 of 11,178,054 parameters train (75.1%)'."""
    total = sum(p.numel() for p in model.parameters())
    trainable = count_trainable(model)
    percent = 100.0 * trainable / max(total, 1)
    shown = f"{percent:.1f}" if percent >= 1 or percent == 0 else f"{percent:.2g}"  # a linear probe is ~0.01 %
    return f"{trainable:,} of {total:,} parameters train ({shown}%)"


class Strategy:
    """Full fine-tuning: every parameter trains; lr per group follows `lr_decay`."""

    name = "full"

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config

    # ------------------------------------------------------------ what trains

    def check(self, groups: list[LayerGroup], model: nn.Module) -> None:
        """Raise VisionFTError when the config does not fit this model (called by `set_trainable`)."""
        if self.config.freeze_groups:
            raise VisionFTError(
                f"finetune.freeze_groups={self.config.freeze_groups} has no effect with strategy '{self.name}'; "
                "use strategy 'partial' (or 'progressive') or set freeze_groups to 0")

    def trainable_groups(self, groups: list[LayerGroup], epoch: int) -> list[int]:
        """Indices of the layer groups that train in `epoch` (1-based)."""
        return [group.index for group in groups]

    def adapt(self, model: nn.Module) -> None:
        """Change the architecture as the strategy needs (LoRA: inject adapters), in place.

        Loading a trained run for eval, predict or export calls only this, before the
        checkpoint's weights go in; it never decides what trains.
        """

    def set_trainable(self, model: nn.Module, epoch: int = 1) -> None:
        """Set requires_grad for `epoch` (1-based): the trainable set before the optimizer is
        built, and after a resume (with the last finished epoch).

        Raises:
            VisionFTError: the config does not fit the model (e.g. more frozen groups than it has).
        """
        groups = layer_groups(model)
        self.check(groups, model)
        set_trainable_groups(model, groups, self.trainable_groups(groups, epoch))

    def prepare(self, model: nn.Module) -> None:
        """A fresh model ready for epoch 1: `adapt`, `set_trainable` for epoch 1, and every frozen
        BatchNorm applied by the conv before it while it stays frozen (`norm_folding`)."""
        self.adapt(model)
        self.set_trainable(model, epoch=1)
        fold_norms_into(model)

    # ------------------------------------------------------------ optimizer groups

    def start_step(self, group: LayerGroup, groups: list[LayerGroup]) -> int:
        """Step at which `group` joined the optimizer (0: from the start; later joins warm up)."""
        return 0

    def group_lr(self, group: LayerGroup, groups: list[LayerGroup], lr: float) -> float:
        """Layer-wise decay: lr * lr_decay ** (number of groups between `group` and the head)."""
        return lr * self.config.lr_decay ** (groups[-1].index - group.index)

    def optimizer_groups(self, model: nn.Module, group: LayerGroup, groups: list[LayerGroup], lr: float,
                         weight_decay: float, start_step: int) -> list[dict[str, Any]]:
        """The optimizer groups (decay / no decay) for the trainable parameters of one layer group."""
        params = dict(model.named_parameters())
        named = [(name, params[name]) for name in group.param_names]
        return decay_split_groups(named, self.group_lr(group, groups, lr), weight_decay,
                                  start_step=start_step, layer_group=group.name)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups for the parameters that train now, head first, top-down.

        Each carries `base_lr` and `start_step` so the schedule can warm up groups that join
        later. The order only depends on which groups train, so a resumed run rebuilds the
        groups of its checkpoint in the same order.
        """
        groups = layer_groups(model)
        result = []
        for group in reversed(groups):
            result += self.optimizer_groups(model, group, groups, lr, weight_decay, self.start_step(group, groups))
        if not result:
            raise VisionFTError(f"strategy '{self.name}' left no parameter of {model_label(model)} trainable")
        return result

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: Any, step: int, lr: float, weight_decay: float) -> bool:
        """Adjust the trainable set for `epoch`; return True when it changed (DDP must re-wrap)."""
        return False

    # ------------------------------------------------------------ modes, logging, state

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode; under frozen_bn='freeze' norms of frozen groups stay in eval mode."""
        train_mode_with_frozen_bn(model, self.config.frozen_bn)

    def training_groups(self, model: nn.Module) -> list[LayerGroup]:
        """Layer groups with at least one trainable parameter, head first."""
        params = dict(model.named_parameters())
        return [g for g in reversed(layer_groups(model)) if any(params[n].requires_grad for n in g.param_names)]

    def describe(self, model: nn.Module) -> str:
        """One log line: which groups train, how many parameters, the lr decay and BN policy."""
        groups = layer_groups(model)
        training = self.training_groups(model)
        if len(training) == len(groups):
            which = f"all {len(groups)} layer groups"
        else:
            which = f"{', '.join(g.name for g in training)} ({len(training)} of {len(groups)} layer groups)"
        return f"{self.name}: training {which}; {trainable_summary(model)}{self._policy_note(model)}"

    def _policy_note(self, model: nn.Module) -> str:
        notes = []
        if self.config.lr_decay < 1:
            notes.append(f"lr x{self.config.lr_decay:g} per group below the head")
        frozen_norms = len(frozen_norm_layers(model))
        if frozen_norms:
            verb = "fixed" if self.config.frozen_bn == "freeze" else "updating"
            notes.append(f"running stats of {frozen_norms} frozen norm layers {verb}")
        return "; " + "; ".join(notes) if notes else ""

    def extra_checkpoint_files(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        """Extra safetensors files to write into every checkpoint folder: {file name: tensors}."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable strategy state saved with each checkpoint (to resume mid-schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; on resume called after `adapt` and before `set_trainable`."""


class LinearProbeStrategy(Strategy):
    """Only the head trains; the backbone's weights (and, by default, its BatchNorm statistics) are frozen."""

    name = "linear_probe"

    def trainable_groups(self, groups: list[LayerGroup], epoch: int) -> list[int]:
        return [groups[-1].index]


class PartialStrategy(Strategy):
    """The first `freeze_groups` layer groups (from the stem) are frozen, the rest trains."""

    name = "partial"

    def check(self, groups: list[LayerGroup], model: nn.Module) -> None:
        check_freeze_groups(self.config.freeze_groups, groups, model, minimum=1)

    def trainable_groups(self, groups: list[LayerGroup], epoch: int) -> list[int]:
        return [group.index for group in groups[self.config.freeze_groups:]]


def check_freeze_groups(freeze_groups: int, groups: list[LayerGroup], model: nn.Module, minimum: int = 0) -> None:
    """`freeze_groups` must leave the head trainable (and be at least `minimum`)."""
    below_head = len(groups) - 1
    span = f"{groups[0].name} … {groups[-2].name}" if below_head > 1 else groups[0].name
    if freeze_groups > below_head:
        raise VisionFTError(
            f"finetune.freeze_groups={freeze_groups} but {model_label(model)} has only {below_head} layer groups "
            f"below its head ({span}); set it to at most {below_head}")
    if freeze_groups < minimum:
        raise VisionFTError(
            f"finetune.freeze_groups={freeze_groups} freezes nothing; set it between {minimum} and {below_head} "
            f"({model_label(model)} groups below the head: {span}) or use strategy 'full'")
