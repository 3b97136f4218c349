"""Frozen BatchNorm folded into the LoRA conv before it, while both are frozen.

A BatchNorm in eval mode whose parameters do not train is a fixed per-channel affine map,
y = scale * x + shift, so conv -> BN computes conv(x, scale * W) + scale * bias + shift. When the
conv is a LoRA adapter, scale moves onto W and B (the adapter's delta is B @ A, so scaling B's
rows scales the delta's output channels) and the BN layer passes its input through. That saves
the BN layer's two activation-sized passes (forward, and backward to its input) per adapted
conv; they are about a quarter of a frozen BN CNN's step on a CPU.

The fold is decided at every forward from the BN layer's state (`norm_is_frozen`), by both
layers alike: a BN layer put back in training mode, or whose parameters are set to train (LoRA
with train_norm), runs as usual and its conv stops folding. Weights, buffers, state-dict keys
and the adapter's own tensors are never changed; `unfold_norms` restores the layers' classes
(merge_lora does, so exported models hold plain BN layers).

Pairs are found on a symbolic trace (torch.fx): a BN layer is folded only when every call of it
takes the output of its conv and that output goes nowhere else. A model that does not trace
keeps its BN layers as they are.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

try:  # timm's BatchNorm + activation layer: the BN of EfficientNet, MobileNet, RegNet, ...
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency; guard for a stripped install
    BatchNormAct2d = None

__all__ = ["fold_norms_into", "unfold_norms", "norm_is_frozen", "folded_weights", "conv_norm_pairs", "folding_class",
           "FoldedBatchNorm2d"]


def norm_is_frozen(norm: nn.Module) -> bool:
    """Whether `norm` is a fixed affine map now: eval mode, running statistics, no trained parameter."""
    return (not norm.training and norm.running_mean is not None and norm.running_var is not None
            and not any(p.requires_grad for p in norm.parameters(recurse=False)))


def folded_weights(norm: nn.Module, weight: Tensor, bias: Tensor | None, lora_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scale * W, scale * bias + shift, scale * B) for a frozen BN layer `norm` after the conv.

    scale and shift are constants; W, bias and B keep their autograd graphs (a multiply is their
    only extra step, on weight-sized tensors).
    """
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.float() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.float()
        shift = -norm.running_mean.float() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.float()
    # An elementwise product keeps W's memory layout (channels-last stays channels-last).
    scaled_weight = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    scaled_bias = shift.to(weight.dtype) if bias is None else torch.addcmul(shift.to(bias.dtype), bias, scale.to(bias.dtype))
    return scaled_weight, scaled_bias, lora_b * scale.to(lora_b.dtype)[:, None]


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose conv applies it while it is frozen: then the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x if norm_is_frozen(self) else super().forward(x)


_FOLDED_CLASSES: dict[type, type] = {nn.BatchNorm2d: FoldedBatchNorm2d}

if BatchNormAct2d is not None:
    class FoldedBatchNormAct2d(BatchNormAct2d):
        """timm's BatchNormAct2d whose conv applies the BN part while it is frozen: then only
        its dropout and activation run."""

        def forward(self, x: Tensor) -> Tensor:
            return self.act(self.drop(x)) if norm_is_frozen(self) else super().forward(x)

    _FOLDED_CLASSES[BatchNormAct2d] = FoldedBatchNormAct2d
    __all__.append("FoldedBatchNormAct2d")

_ORIGINAL_CLASSES = {folded: original for original, folded in _FOLDED_CLASSES.items()}


def folding_class(norm: nn.Module) -> type | None:
    """The class that lets `norm` be applied by its conv, or None for a BN type without one."""
    return _FOLDED_CLASSES.get(type(norm))


class _LeafTracer(torch.fx.Tracer):
    """Traces calls to convs, norms and the given module types without entering them."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d, *self.leaf_types)) or super().is_leaf_module(
            module, qualified_name)


def conv_norm_pairs(model: nn.Module, conv_type: type) -> list[tuple[str, str]]:
    """(conv name, BN name) where the BN layer only ever normalises that conv's output, and the
    conv's output feeds only that BN layer."""
    try:
        graph = _LeafTracer((conv_type,)).trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace simply keeps its BN layers
        return []
    modules = dict(model.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for conv_name, conv_calls in calls.items():
        if not isinstance(modules[conv_name], conv_type):
            continue
        users = {user for node in conv_calls for user in node.users}
        norm_names = {user.target for user in users if user.op == "call_module"}
        if len(norm_names) != 1 or any(len(node.users) != 1 for node in conv_calls) or len(users) != len(conv_calls):
            continue
        norm_name = norm_names.pop()
        if type(modules[norm_name]) not in _FOLDED_CLASSES:
            continue
        norm_calls = calls[norm_name]
        # Every call of the BN layer takes one of this conv's outputs and nothing else.
        if all(len(node.args) == 1 and not node.kwargs and node.args[0] in conv_calls for node in norm_calls):
            pairs.append((conv_name, norm_name))
    return pairs


def fold_norms_into(model: nn.Module, conv_type: type) -> list[str]:
    """Let every `conv_type` layer (a LoRA conv) apply the BN layer after it while that BN is frozen.

    Sets the conv's `folded_norm` and switches the BN layer to its folding class (same
    parameters, buffers and state-dict keys). Returns the names of the BN layers.
    """
    folded = []
    for conv_name, norm_name in conv_norm_pairs(model, conv_type):
        norm = model.get_submodule(norm_name)
        norm.__class__ = folding_class(norm)
        # A plain attribute, not a submodule: the BN layer stays where its state-dict keys say.
        object.__setattr__(model.get_submodule(conv_name), "folded_norm", norm)
        folded.append(norm_name)
    return folded


def unfold_norms(model: nn.Module) -> None:
    """Every folding BN layer back to its own class (its conv must no longer fold it)."""
    for module in model.modules():
        original = _ORIGINAL_CLASSES.get(type(module))
        if original is not None:
            module.__class__ = original
        if getattr(module, "folded_norm", None) is not None:
            object.__setattr__(module, "folded_norm", None)
