"""The classifier head of a model: the one place that finds it.

timm models name their head through `get_classifier()`: one module for most (`fc`, `head.fc`,
`classifier`), a tuple for distilled models (`head` and `head_dist` of deit's distilled
variants). A model without a usable `get_classifier` (not a timm model, or one built with
num_classes=0) has its last top-level child with parameters taken as the head.

Layer groups (the head is the last group), LoRA (never wraps the head, trains it in full),
weight loading (drops the pretrained head for new classes) and head initialisation all ask here.
"""

from __future__ import annotations

from torch import nn

from vision_ft.errors import VisionFTError


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every classifier head of `model`, in model order."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        reported = get_classifier()
        heads = reported if isinstance(reported, (tuple, list)) else (reported,)
        wanted = {id(h) for h in heads if isinstance(h, nn.Module) and _has_params(h)}
        found = [(name, module) for name, module in model.named_modules() if name and id(module) in wanted]
        if found:
            return found
    # Not a timm model (or a head without parameters): the last top-level child that has some.
    children = [(name, child) for name, child in model.named_children() if _has_params(child)]
    if not children:
        raise VisionFTError(f"{type(model).__name__} has no parameters to fine-tune")
    return [children[-1]]


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s), e.g. ['fc'] or ['head', 'head_dist']."""
    return [name for name, _ in head_modules(model)]


def head_module_names(model: nn.Module) -> set[str]:
    """Names of the head modules and of every module inside them."""
    return {name for name, _ in _modules_inside(model, head_names(model))}


def head_param_names(model: nn.Module) -> list[str]:
    """Names of the classifier's parameters, in model order."""
    names = head_names(model)
    return [name for name, _ in model.named_parameters() if is_head_key(name, names)]


def is_head_key(key: str, names: list[str]) -> bool:
    """Whether a parameter or state-dict key belongs to one of the head modules `names`."""
    return any(key.startswith(name + ".") for name in names)


def _modules_inside(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if name and (name in names or is_head_key(name, names))]
