"""Freezing mechanics shared by every strategy: which parameters train, and which
normalisation layers keep their running statistics fixed.

Frozen BatchNorm layers are kept in eval mode rather than swapped for FrozenBatchNorm2d (as
`timm.utils.freeze` does): the module types and state-dict keys stay the same, so a group can
be unfrozen again mid-run and every checkpoint loads into a freshly built model.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from vision_ft.finetune.layer_groups import LayerGroup


def set_trainable_groups(model: nn.Module, groups: list[LayerGroup], trainable: Iterable[int]) -> None:
    """requires_grad=True for the parameters of the groups in `trainable`, False for all others."""
    chosen = set(trainable)
    wanted = {name for group in groups if group.index in chosen for name in group.param_names}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)


def has_running_stats(module: nn.Module) -> bool:
    """BatchNorm-like layers (incl. timm's BatchNormAct2d, SyncBatchNorm) that track running statistics."""
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


def frozen_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Running-statistics norm layers that sit in a frozen part of the model.

    A layer counts as frozen when none of its own parameters trains. A layer without affine
    parameters follows the nearest enclosing module that has parameters.
    """
    frozen = []
    for name, module in model.named_modules():
        if not has_running_stats(module):
            continue
        own = list(module.parameters(recurse=False))
        if own:
            if not any(p.requires_grad for p in own):
                frozen.append((name, module))
            continue
        owner = _nearest_owner_with_params(model, name)
        if owner is not None and not any(p.requires_grad for p in owner.parameters()):
            frozen.append((name, module))
    return frozen


def _nearest_owner_with_params(model: nn.Module, name: str) -> nn.Module | None:
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth])) if depth else model
        if any(True for _ in owner.parameters()):
            return owner
    return None


def train_mode_with_frozen_bn(model: nn.Module, frozen_bn: str) -> None:
    """model.train(), then, with frozen_bn='freeze', frozen norm layers back to eval mode so
    their running mean/var stay what pretraining measured."""
    model.train()
    if frozen_bn == "freeze":
        for _, module in frozen_norm_layers(model):
            module.eval()
