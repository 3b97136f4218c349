"""Plain, obviously-correct LoRA convolution: the yardstick the kernels' tests hold them to.

Test code only (the package never calls it).

Every function here is a direct composition of `F.conv2d` calls that autograd differentiates;
none of them is tuned. The factorization they define is the one the whole package uses:

    delta_W = B @ A.reshape(r, -1), reshaped to W's shape (Cout, Cin / groups, kh, kw)

with A = `lora_a` (r, Cin / groups, kh, kw) and B = `lora_b` (Cout, r). For groups == 1 this is
the usual LoRA conv (a down-projection conv with A, then a 1x1 up-projection with B); for
grouped and depthwise convs it makes delta_W exactly W's shape, so merging stays exact.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lora_delta_weight(weight_shape: tuple[int, ...], lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """B @ A as a conv weight of `weight_shape` (unscaled), written out independently of the package."""
    return (lora_b @ lora_a.reshape(lora_a.shape[0], -1)).reshape(weight_shape)


def reference_lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int = 1,
) -> Tensor:
    """conv2d(x, W, bias) + scaling * conv2d(x, B @ A): base conv plus the LoRA delta.

    groups == 1 evaluates the delta as down-projection then up-projection (as peft does);
    groups > 1 convolves with the materialised delta weight.
    """
    base = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if groups == 1:
        down = F.conv2d(x, lora_a, None, stride, padding, dilation)
        delta = F.conv2d(down, lora_b[:, :, None, None])
    else:
        delta = F.conv2d(x, lora_delta_weight(weight.shape, lora_a, lora_b), None, stride, padding, dilation, groups)
    return base + scaling * delta


def low_rank_grouped_lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """The grouped delta evaluated peft-style, through the rank-r bottleneck.

    Every group's input is projected onto the r kernels of A (a grouped conv with A repeated
    per group: groups * r channels), then a grouped 1x1 conv with B mixes each output channel's
    own group. Equal to `reference_lora_conv2d` by linearity; kept as the unfused baseline the
    grouped fast path is measured against.
    """
    base = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    down = F.conv2d(x, lora_a.repeat(groups, 1, 1, 1), None, stride, padding, dilation, groups)
    delta = F.conv2d(down, lora_b[:, :, None, None], groups=groups)
    return base + scaling * delta
