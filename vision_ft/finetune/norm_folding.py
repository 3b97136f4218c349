"""Frozen BatchNorm folded into the conv before it, while the BN layer is frozen.

A BatchNorm in eval mode whose parameters do not train is a fixed per-channel affine map,
y = scale * x + shift, so conv -> BN computes conv(x, scale * W) + scale * bias + shift. The conv
applies it (a multiply on weight-sized tensors) and the BN layer passes its input through. That
saves the BN layer's activation-sized passes: forward, and backward to its input when gradients
flow through it. They are about a quarter of a frozen BN CNN's training step on a CPU, which is
what LoRA, linear probing and partial freezing run through.

Plain nn.Conv2d layers (and timm's Conv2dSame) become `FoldingConv2d` (`FoldingConv2dSame`);
LoRA convs fold by themselves (their delta is B @ A, so B's rows take the scale). The fold is
decided at every forward from the BN layer's state (`norm_is_frozen`), by both layers alike: a BN
layer put back in training mode, or whose parameters are set to train (full fine-tuning, a group
that progressive unfreezing reaches, LoRA with train_norm), runs as usual and its conv stops
folding. Weights, buffers and state-dict keys are never changed; `unfold_norms` restores the
layers' classes (merge_lora and the ONNX exporter do, so exported models hold plain layers).

Pairs are found on a symbolic trace (torch.fx): a BN layer is folded only when every call of it
takes the output of its conv and that output goes nowhere else. A model that does not trace
keeps its BN layers as they are.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import BatchNormAct2d, Conv2dSame  # BN + activation of EfficientNet, MobileNet, RegNet
from timm.layers.padding import pad_same

__all__ = ["fold_norms_into", "unfold_norms", "norm_is_frozen", "folded_weights", "conv_norm_pairs",
           "FoldedBatchNorm2d", "FoldedBatchNormAct2d", "FoldingConv2d", "FoldingConv2dSame"]


def norm_is_frozen(norm: nn.Module) -> bool:
    """Whether `norm` is a fixed affine map now: eval mode, running statistics, no trained parameter."""
    return (not norm.training and norm.running_mean is not None and norm.running_var is not None
            and not any(p.requires_grad for p in norm.parameters(recurse=False)))


def folded_weights(norm: nn.Module, weight: Tensor, bias: Tensor | None,
                   lora_b: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(scale * W, scale * bias + shift, scale * B) for a frozen BN layer `norm` after the conv.

    scale and shift are constants; W, bias and B keep their autograd graphs (a multiply is their
    only extra step, on weight-sized tensors).
    """
    compute = torch.promote_types(weight.dtype, torch.float32)  # fp32 for 16-bit weights, fp64 stays
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.to(compute) + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.to(compute)
        shift = -norm.running_mean.to(compute) * scale
        if norm.bias is not None:
            shift = shift + norm.bias.to(compute)
    # An elementwise product keeps W's memory layout (channels-last stays channels-last).
    scaled_weight = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    scaled_bias = shift.to(weight.dtype) if bias is None else torch.addcmul(shift.to(bias.dtype), bias, scale.to(bias.dtype))
    return scaled_weight, scaled_bias, None if lora_b is None else lora_b * scale.to(lora_b.dtype)[:, None]


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose conv applies it while it is frozen: then the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x if norm_is_frozen(self) else super().forward(x)


class FoldedBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d whose conv applies the BN part while it is frozen: then only its
    dropout and activation run."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x)) if norm_is_frozen(self) else super().forward(x)


class _FoldingConv:
    """The fold for a conv class: its own forward while the BN layer after it (`folded_norm`)
    runs itself, else one convolution with the BN's scale and shift in the weights."""

    folded_norm: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.folded_norm is None or not norm_is_frozen(self.folded_norm):
            return super().forward(x)  # type: ignore[misc]
        weight, bias, _ = folded_weights(self.folded_norm, self.weight, self.bias)  # type: ignore[attr-defined]
        return self._convolve(x, weight, bias)


class FoldingConv2d(_FoldingConv, nn.Conv2d):
    """nn.Conv2d that applies the frozen BN layer after it."""

    def _convolve(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return self._conv_forward(x, weight, bias)


class FoldingConv2dSame(_FoldingConv, Conv2dSame):
    """timm's Conv2dSame (TensorFlow 'SAME' padding) that applies the frozen BN layer after it."""

    def _convolve(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, (0, 0), self.dilation, self.groups)


# Each foldable class and the class it becomes; adapter convs (LoRA) fold in their own forward.
_FOLDING_CLASSES: dict[type, type] = {
    nn.BatchNorm2d: FoldedBatchNorm2d,
    BatchNormAct2d: FoldedBatchNormAct2d,
    nn.Conv2d: FoldingConv2d,
    Conv2dSame: FoldingConv2dSame,
}
_ORIGINAL_CLASSES = {folding: original for original, folding in _FOLDING_CLASSES.items()}
_NORM_TYPES = (nn.BatchNorm2d, BatchNormAct2d)


def _can_fold_into(module: nn.Module) -> bool:
    """A conv that can apply a BN layer: a plain conv of a known class, or one that reads
    `folded_norm` itself (LoRAConv2d) and has none yet."""
    if type(module) in (nn.Conv2d, Conv2dSame):
        return True
    return type(module) not in _ORIGINAL_CLASSES and "folded_norm" in vars(module) and module.folded_norm is None


class _LeafTracer(torch.fx.Tracer):
    """Traces calls to convs, norms and adapter convs without entering them."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or "folded_norm" in vars(module)
                or super().is_leaf_module(module, qualified_name))


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for each conv that can fold the BN layer after it: the BN layer only
    ever normalises that conv's output, and the conv's output feeds only that BN layer."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace simply keeps its BN layers
        return []
    modules = dict(model.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for conv_name, conv_calls in calls.items():
        if not _can_fold_into(modules[conv_name]):
            continue
        users = {user for node in conv_calls for user in node.users}
        norm_names = {user.target for user in users if user.op == "call_module"}
        if len(norm_names) != 1 or any(len(node.users) != 1 for node in conv_calls) or len(users) != len(conv_calls):
            continue
        norm_name = norm_names.pop()
        if type(modules[norm_name]) not in _NORM_TYPES:  # exact types: a subclass may normalise differently
            continue
        # Every call of the BN layer takes one of this conv's outputs and nothing else.
        if all(len(node.args) == 1 and not node.kwargs and node.args[0] in conv_calls for node in calls[norm_name]):
            pairs.append((conv_name, norm_name))
    return pairs


def fold_norms_into(model: nn.Module) -> list[str]:
    """Let every conv that can apply the BN layer after it do so while that BN is frozen.

    Switches plain convs and BN layers to their folding classes (same parameters, buffers and
    state-dict keys) and sets each conv's `folded_norm`. Convs already folding are left alone.
    Returns the names of the BN layers folded now.
    """
    folded = []
    for conv_name, norm_name in conv_norm_pairs(model):
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        norm.__class__ = _FOLDING_CLASSES[type(norm)]
        conv.__class__ = _FOLDING_CLASSES.get(type(conv), type(conv))
        # A plain attribute, not a submodule: the BN layer stays where its state-dict keys say.
        object.__setattr__(conv, "folded_norm", norm)
        folded.append(norm_name)
    return folded


def unfold_norms(model: nn.Module) -> None:
    """Every folding conv and BN layer back to its own class and computation."""
    for module in model.modules():
        original = _ORIGINAL_CLASSES.get(type(module))
        if original is not None:
            module.__class__ = original
        if "folded_norm" in vars(module):
            if original is not None:
                object.__delattr__(module, "folded_norm")
            else:  # an adapter conv, which keeps the attribute
                object.__setattr__(module, "folded_norm", None)
