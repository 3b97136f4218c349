"""Which layers of a model LoRA wraps, which stay trainable, and the errors for bad targets.

Wrappable layers are plain `nn.Conv2d` (and timm's `Conv2dSame`, whose only difference is
TF-style dynamic 'same' padding) and plain `nn.Linear`. Subclasses that change what forward
computes (weight-standardised convs, the out_proj of nn.MultiheadAttention, ...) are skipped:
wrapping them would silently change the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from vision_ft.errors import VisionFTError
from vision_ft.models.head import head_module_names

TARGET_TYPES = ("conv", "linear")


def _timm_conv2d_same() -> type | None:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # timm is a dependency, but keep this module usable without it
        return None
    return Conv2dSame


def layer_kind(module: nn.Module) -> str | None:
    """'conv' or 'linear' for layers LoRA can wrap, else None."""
    if type(module) is nn.Conv2d or (type(module) is _timm_conv2d_same()):
        return "conv"
    if type(module) is nn.Linear:
        return "linear"
    return None


def is_dynamic_same_conv(module: nn.Module) -> bool:
    """timm's Conv2dSame: pads like TensorFlow 'SAME', computed from the input size each call."""
    same = _timm_conv2d_same()
    return same is not None and type(module) is same


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm/LayerNorm/GroupNorm/InstanceNorm and timm's norm variants (BatchNormAct2d, RmsNorm, ...)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def pattern_matches(name: str, pattern: str) -> bool:
    """fnmatch on the full module name, or on its trailing dotted parts ('qkv' matches 'blocks.0.attn.qkv')."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def find_lora_targets(
    model: nn.Module,
    target_patterns: Sequence[str] | None = None,
    target_types: Iterable[str] = TARGET_TYPES,
) -> list[str]:
    """Names of the layers to wrap, in module order.

    Every wrappable layer of a requested type outside the classifier head, filtered by
    `target_patterns` when given. Raises VisionFTError for an unknown type or a pattern that
    selects nothing, saying what the pattern did match.
    """
    types = tuple(target_types)
    unknown = [t for t in types if t not in TARGET_TYPES]
    if unknown or not types:
        raise VisionFTError(
            f"LoRA target_types {list(types)} must be a non-empty list of {', '.join(TARGET_TYPES)}")
    head = head_module_names(model)
    candidates = [
        name for name, module in model.named_modules()
        if name and name not in head and layer_kind(module) in types
    ]
    if target_patterns is None:
        if not candidates:
            raise VisionFTError(
                f"the model has no {' or '.join(types)} layers outside its classifier head for LoRA to wrap; "
                "pick another finetune.strategy")
        return candidates
    for pattern in target_patterns:
        if not any(pattern_matches(name, pattern) for name in candidates):
            raise VisionFTError(_no_match_message(model, pattern, types, head, candidates))
    return [name for name in candidates if any(pattern_matches(name, p) for p in target_patterns)]


def _no_match_message(model: nn.Module, pattern: str, types: tuple[str, ...], head: set[str], candidates: list[str]) -> str:
    matched = [(name, module) for name, module in model.named_modules() if name and pattern_matches(name, pattern)]
    if matched and all(name in head for name, _ in matched):
        return (f"LoRA target '{pattern}' matches only the classifier head, which LoRA never wraps (the head "
                "trains in full); remove it from finetune.lora.targets")
    if matched:
        kinds = sorted({type(module).__name__ for _, module in matched})
        return (f"LoRA target '{pattern}' matches {len(matched)} module(s) of type {', '.join(kinds)}, none a plain "
                f"{' or '.join(types)} layer LoRA can wrap; target the nn.Conv2d/nn.Linear layers inside them, "
                f"e.g. '{pattern}.*'")
    examples = ", ".join(candidates[:4]) if candidates else "none"
    return (f"LoRA target '{pattern}' matches no layer of the model; patterns are fnmatch on module names "
            f"(wrappable names start: {examples})")
