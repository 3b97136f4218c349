"""LoRA adapters for convolutions and linear layers: modules, injection, merging, adapter state.

A wrapped layer computes W x + scaling * (B @ A) x with W frozen, A (r x fan-in) initialised
kaiming-uniform as in peft and B (out x r) zero, so a fresh adapter leaves the model unchanged.
scaling is alpha / r, or alpha / sqrt(r) with rsLoRA.

Convolutions keep everything the wrapped layer supports: stride, dilation, integer, tuple or
'same' padding (and timm's dynamic Conv2dSame), every padding_mode, and groups. For grouped and
depthwise convs A is (r, Cin / groups, kh, kw), the same layout as for groups == 1, and the delta
is B @ A reshaped to W's exact shape (Cout, Cin / groups, kh, kw): every output channel's filter
moves inside one shared r-dimensional space of filters. Merging is exact for every conv, and
the forward convolves once with W + scaling * B @ A (see vision_ft_kernels.torch_lora_conv).

The LoRA modules hold the wrapped layer's own `weight` and `bias` Parameters under the same
names, so a model's full state dict keeps its keys (plus `lora_a` / `lora_b`) and `merge_lora`
hands back plain nn.Conv2d / nn.Linear layers that load the original checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision_ft.errors import VisionFTError
from vision_ft.finetune.norm_folding import fold_norms_into, folded_weights, norm_is_frozen, unfold_norms
from vision_ft.finetune.lora_targets import TARGET_TYPES, find_lora_targets, is_dynamic_same_conv, is_norm_layer, layer_kind
from vision_ft.models.head import head_module_names
from vision_ft_kernels import lora_conv2d

__all__ = [
    "LoRAConv2d",
    "LoRALinear",
    "apply_lora",
    "inject_lora",
    "train_adapters_only",
    "merge_lora",
    "lora_modules",
    "lora_state_dict",
    "load_lora_state_dict",
    "lora_scaling",
]


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (keeps updates stable as the rank grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class _LoRABase(nn.Module):
    """Shared parts: hyper-parameters, merge bookkeeping, the delta weight."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def _init_lora(self, r: int, alpha: float, dropout: float, rslora: bool, a_shape: tuple[int, ...]) -> None:
        if r < 1:
            raise VisionFTError(f"LoRA rank r={r} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise VisionFTError(f"LoRA dropout {dropout} must be in [0, 1)")
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        weight = self.weight
        self.lora_a = nn.Parameter(torch.empty(a_shape, dtype=weight.dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(weight.shape[0], r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as peft: a fresh A has the layer's fan-in
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for param in (self.weight, self.bias):
            if param is not None:
                param.requires_grad_(False)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A in W's shape and dtype (computed in fp32 for half-precision weights)."""
        a, b = self.lora_a, self.lora_b
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        delta = (b @ a.reshape(a.shape[0], -1)).reshape(self.weight.shape) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into W; forward then runs the plain layer. No-op when merged."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight())  # in place (not .data): bumps W's version counter
        self._merged_versions = (self.lora_a._version, self.lora_b._version)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from W again (equal up to float rounding). No-op when not merged."""
        if not self.merged:
            return
        if (self.lora_a._version, self.lora_b._version) != self._merged_versions:
            raise RuntimeError("the adapter changed while merged into W, so W cannot be restored; "
                               "unmerge before training or loading adapter weights")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def _lora_repr(self) -> str:
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={dropout:g}, merged={self.merged}"


def _tf_same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dim: output = ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class LoRAConv2d(_LoRABase):
    """A LoRA adapter around an nn.Conv2d (or timm Conv2dSame); W and bias are frozen.

    Groups == 1 goes through `vision_ft_kernels.lora_conv2d` (Triton on CUDA when it applies,
    the fused torch path elsewhere); grouped and depthwise convs take its grouped torch path.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        rslora: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if layer_kind(conv) != "conv":
            raise VisionFTError(f"LoRAConv2d wraps nn.Conv2d or timm Conv2dSame layers, not {type(conv).__name__}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.padding_mode, self.groups = conv.padding, conv.padding_mode, conv.groups
        self.dynamic_same = is_dynamic_same_conv(conv)
        self.base_class = type(conv)
        self.backend = backend
        self.folded_norm: nn.Module | None = None  # set by norm_folding, never a submodule
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_lora(r, alpha, dropout, rslora, (r, *conv.weight.shape[1:]))

    def _pad_amounts(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) padding the wrapped conv applies to `x`."""
        if self.dynamic_same:
            return tuple(  # type: ignore[return-value]
                _tf_same_padding(x.shape[2 + i], self.kernel_size[i], self.stride[i], self.dilation[i]) for i in range(2))
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":  # torch's convention: the odd pixel goes after
            totals = [self.dilation[i] * (self.kernel_size[i] - 1) for i in range(2)]
            return tuple((t // 2, t - t // 2) for t in totals)  # type: ignore[return-value]
        return tuple((p, p) for p in self.padding)  # type: ignore[return-value]

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """`x` padded as the wrapped conv would, plus the symmetric padding left to conv2d."""
        (top, bottom), (left, right) = self._pad_amounts(x)
        if self.padding_mode != "zeros":
            return F.pad(x, (left, right, top, bottom), mode=self.padding_mode), (0, 0)
        if (top, left) != (bottom, right):
            # Only the asymmetric excess is padded explicitly; conv2d pads the symmetric part.
            x = F.pad(x, (0, right - left, 0, bottom - top))
        return x, (top, left)

    def forward(self, x: Tensor) -> Tensor:
        padded, padding = self._padded(x)
        weight, bias, lora_b = self.weight, self.bias, self.lora_b
        if self.folded_norm is not None and norm_is_frozen(self.folded_norm):
            # The frozen BN after this conv is applied here and passes its input through.
            weight, bias, lora_b = folded_weights(self.folded_norm, weight, bias, lora_b)
        if self.merged:
            return F.conv2d(padded, weight, bias, self.stride, padding, self.dilation, self.groups)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # Dropout feeds A a different input than W, so the single-pass kernel does not apply.
            base = F.conv2d(padded, weight, bias, self.stride, padding, self.dilation, self.groups)
            dropped, _ = self._padded(self.lora_dropout(x))
            if self.groups == 1:
                down = F.conv2d(dropped, self.lora_a, None, self.stride, padding, self.dilation)
                delta = F.conv2d(down, lora_b[:, :, None, None])
            else:
                delta_weight = (lora_b @ self.lora_a.flatten(1)).view_as(weight)
                delta = F.conv2d(dropped, delta_weight, None, self.stride, padding, self.dilation, self.groups)
            return base + self.scaling * delta
        return lora_conv2d(padded, weight, bias, self.lora_a, lora_b, self.scaling,
                           self.stride, padding, self.dilation, self.groups, backend=self.backend)

    def to_base(self) -> nn.Conv2d:
        """A plain layer of the wrapped class holding W (+ the adapter when merged) and bias."""
        kwargs = dict(stride=self.stride, dilation=self.dilation, groups=self.groups, bias=self.bias is not None)
        if self.dynamic_same:
            conv = self.base_class(self.in_channels, self.out_channels, self.kernel_size, **kwargs)
        else:
            conv = self.base_class(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                                   padding_mode=self.padding_mode, device="meta", **kwargs)
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        padding = "tf-same" if self.dynamic_same else self.padding
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode}, {self._lora_repr()}")


class LoRALinear(_LoRABase):
    """A LoRA adapter around an nn.Linear; W and bias are frozen."""

    def __init__(self, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        if layer_kind(linear) != "linear":
            raise VisionFTError(f"LoRALinear wraps nn.Linear layers, not {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_lora(r, alpha, dropout, rslora, (r, linear.in_features))

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight, self.bias)
        if self.merged:
            return base
        return base + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear holding W (+ the adapter when merged) and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._lora_repr()}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRAConv2d | LoRALinear]]:
    """(name, module) for every LoRA module in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRAConv2d, LoRALinear)):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
    target_patterns: Sequence[str] | None = None,
    target_types: Sequence[str] = TARGET_TYPES,
    backend: str | None = None,
) -> list[str]:
    """Wrap the target layers of `model` in LoRA adapters, in place; requires_grad is left alone
    except that the wrapped layers' own W and bias are frozen.

    Targets are every nn.Conv2d / nn.Linear outside the classifier head (`vision_ft.models.head`)
    of the kinds in `target_types`, narrowed by `target_patterns` (fnmatch on module names,
    also matched against trailing name parts: 'qkv' selects every '*.qkv'). `backend` ('auto',
    'torch', 'triton') is each conv adapter's kernel setting; None leaves it to the one default
    (`vision_ft_kernels`: $VISION_FT_LORA_BACKEND, else 'auto').

    Returns:
        The names of the wrapped layers.

    Raises:
        VisionFTError: a pattern selects nothing, the model already has adapters, bad r/dropout.
    """
    if any(True for _ in lora_modules(model)):
        raise VisionFTError("the model already has LoRA adapters; apply_lora once per model (or merge_lora first)")
    names = find_lora_targets(model, target_patterns, target_types)
    for name in names:
        layer = model.get_submodule(name)
        if layer_kind(layer) == "conv":
            wrapped: nn.Module = LoRAConv2d(layer, r, alpha, dropout, rslora, backend)
        else:
            wrapped = LoRALinear(layer, r, alpha, dropout, rslora)
        wrapped.train(layer.training)
        _replace(model, name, wrapped)
    fold_norms_into(model)
    return names


def train_adapters_only(model: nn.Module, train_norm: bool = False) -> None:
    """requires_grad for the adapters, the classifier head and, with `train_norm`, the
    normalisation layers; everything else frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in lora_modules(model):
        module.lora_a.requires_grad_(True)
        module.lora_b.requires_grad_(True)
    head = head_module_names(model)
    for name, module in model.named_modules():
        if name in head or (train_norm and is_norm_layer(module)):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)


def apply_lora(model: nn.Module, train_norm: bool = False, **inject_options: Any) -> list[str]:
    """`inject_lora(model, **inject_options)` (r, alpha, dropout, rslora, target_patterns,
    target_types, backend), then `train_adapters_only(model, train_norm)`: the model ready to
    fine-tune its adapters. Returns the names of the wrapped layers."""
    names = inject_lora(model, **inject_options)
    train_adapters_only(model, train_norm)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its layer and swap in plain nn.Conv2d / nn.Linear layers, in place.

    The result contains no LoRA modules, computes the same outputs and returns `model`.
    """
    unfold_norms(model)
    for name, module in list(lora_modules(model)):
        module.merge()
        _replace(model, name, module.to_base())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only ('<layer>.lora_a', '<layer>.lora_b'), detached copies.

    The keys match `model.state_dict()`. The classifier head and trained norms are not
    included: save those with the rest of the checkpoint.
    """
    state: dict[str, Tensor] = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_a"] = module.lora_a.detach().clone()
        state[f"{name}.lora_b"] = module.lora_b.detach().clone()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors from `lora_state_dict` onto a model injected with the same targets.

    Raises:
        VisionFTError: one line naming the first missing, unexpected or mis-shaped key.
    """
    modules = dict(lora_modules(model))
    if not modules:
        raise VisionFTError("the model has no LoRA adapters to load into; call apply_lora(model, ...) with the "
                            "settings the adapter was trained with first")
    expected = {f"{name}.{part}": getattr(module, part) for name, module in modules.items()
                for part in ("lora_a", "lora_b")}
    for key in state:
        if key not in expected:
            raise VisionFTError(
                f"adapter key '{key}' has no LoRA layer in this model; apply_lora with the target_patterns and "
                "target_types the adapter was trained with")
    for key, param in expected.items():
        if key not in state:
            raise VisionFTError(
                f"adapter state lacks '{key}'; it was saved from a model with other LoRA targets, apply_lora with "
                "the target_patterns and target_types it was trained with")
        got, want = tuple(state[key].shape), tuple(param.shape)
        if got != want:
            rank = got[0] if key.endswith("lora_a") else (got[1] if len(got) == 2 else None)
            raise VisionFTError(
                f"adapter tensor '{key}' has shape {got} but the model expects {want}; apply_lora with the rank "
                f"the adapter was trained with (r={rank} by this tensor) on the same architecture")
    with torch.no_grad():
        for name, module in modules.items():
            was_merged = module.merged
            module.unmerge()
            module.lora_a.copy_(state[f"{name}.lora_a"])
            module.lora_b.copy_(state[f"{name}.lora_b"])
            if was_merged:
                module.merge()
