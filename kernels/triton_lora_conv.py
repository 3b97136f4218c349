"""Fused LoRA convolution in Triton: public entry points and autograd wiring.

    y = conv2d(x, W, bias, stride, padding, dilation) + scaling * B @ conv2d(x, A, ...)

with W (Cout, Cin, kh, kw) and bias frozen, A = `lora_a` (r, Cin, kh, kw), B = `lora_b`
(Cout, r), groups = 1.  The forward is one Triton implicit-GEMM pass (see
`triton_lora_conv_fwd`); the backward mixes Triton and cuDNN (see `triton_lora_conv_bwd`).

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module
was first imported (Triton's interpreter; slow, for tests).  `triton_supports` tells the
dispatcher which calls the kernels handle; everything else takes the torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .conv_shape import conv_output_size, pair
from .triton_common import INTERPRETING, memory_format_of
from .triton_lora_conv_bwd import lora_a_weight_grad, lora_conv2d_input_grad
from .triton_lora_conv_fwd import lora_conv2d_forward

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The in-register z tile is (BLOCK_M, rank padded to a power of two); beyond 64 it crowds
# out the main accumulator, and LoRA ranks above 64 are rare for convolutions.
MAX_RANK = 64
# Kernel offsets are 32-bit: every tensor must have fewer elements than this.
MAX_ELEMENTS = 2**31 - 1

__all__ = ["triton_supports", "triton_lora_conv2d", "MAX_RANK", "SUPPORTED_DTYPES"]


def _grad_into_frozen(weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad))


def triton_supports(x: Tensor, weight: Tensor, lora_a: Tensor, groups: int) -> bool:
    """Whether `triton_lora_conv2d` handles this call; False routes it to the torch path.

    Requires: groups == 1 (depthwise and grouped convs go to torch); 4-d
    tensors with matching channels and kernel size; x and W in fp32, fp16 or bf16 with the
    same dtype (A may be any of the three: it is cast tile by tile); rank <= MAX_RANK; all
    on one CUDA device, or on the CPU under TRITON_INTERPRET=1; tensors small enough for
    32-bit offsets; and a frozen W (W requiring grad while autograd records is False, so the
    dispatcher falls back to the torch path, which can produce dW).
    """
    if groups != 1:
        return False
    if x.dim() != 4 or weight.dim() != 4 or lora_a.dim() != 4:
        return False
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        return False
    if lora_a.dtype not in SUPPORTED_DTYPES:
        return False
    if not (weight.device == x.device and lora_a.device == x.device):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and INTERPRETING)):
        return False
    if weight.shape[1] != x.shape[1] or lora_a.shape[1:] != weight.shape[1:]:
        return False
    if not 1 <= lora_a.shape[0] <= MAX_RANK:
        return False
    batch, _, height, width = x.shape
    # The output is at most as large as for a 'same' conv unless padding exceeds the kernel's
    # reach; `triton_lora_conv2d` re-checks the exact output size.
    if max(x.numel(), batch * weight.shape[0] * height * width) > MAX_ELEMENTS:
        return False
    return not _grad_into_frozen(weight, None)


class _TritonLoraConv2d(torch.autograd.Function):
    """Autograd wiring: Triton forward, Triton + cuDNN backward, gradients for x, A, B only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                lora_b: Tensor, scaling: float, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        # z = conv2d(x, A) is needed only for dB; skip its write when B gets no gradient.
        need_z = ctx.needs_input_grad[4]
        y, z = lora_conv2d_forward(x, weight, bias, lora_a, lora_b, scaling,
                                   stride, padding, dilation, save_z=need_z)
        ctx.save_for_backward(x, weight, lora_a, lora_b, z)
        ctx.conv_args = (scaling, stride, padding, dilation)
        ctx.input_memory_format = memory_format_of(x)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, lora_a, lora_b, z = ctx.saved_tensors
        scaling, stride, padding, dilation = ctx.conv_args
        need_x, need_a, need_b = (ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                                  ctx.needs_input_grad[4])
        grad_x = grad_a = grad_b = None

        if need_x or need_a:
            # dz = s * B^T g: a 1x1 convolution of g with r output channels.  cuDNN runs it at
            # memory bandwidth (one read of g); scaling is folded into the tiny weight.
            scaled_b_t = (lora_b.t() * scaling).to(grad_y.dtype)[:, :, None, None]
            grad_z = F.conv2d(grad_y, scaled_b_t)
            if need_x:
                grad_x = lora_conv2d_input_grad(grad_y, grad_z, weight, lora_a, tuple(x.shape),
                                                ctx.input_memory_format, stride, padding, dilation)
            if need_a:
                grad_a = lora_a_weight_grad(x, grad_z, tuple(lora_a.shape), stride, padding,
                                            dilation).to(lora_a.dtype)
        if need_b:
            # dB = s * sum_pixels g z^T: the weight gradient of a 1x1 conv (cuDNN, as in the
            # unfused path); the weight argument only supplies shape and dtype.
            _, grad_b_4d, _ = torch.ops.aten.convolution_backward(
                grad_y, z, lora_b[:, :, None, None].to(grad_y.dtype), None,
                [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])
            grad_b = (grad_b_4d.flatten(1).float() * scaling).to(lora_b.dtype)

        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def triton_lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """conv2d(x, W, bias) + scaling * B @ conv2d(x, A), differentiable in x, A and B.

    Args:
        x: (N, Cin, H, W) activations, NCHW or channels_last (read through strides).
        weight: frozen (Cout, Cin, kh, kw) base weight, same dtype as `x`; a channels_last
            weight gives coalesced weight loads (input channels contiguous).
        bias: frozen (Cout,) bias or None.
        lora_a: (r, Cin, kh, kw) adapter down-projection.
        lora_b: (Cout, r) adapter up-projection.
        scaling: LoRA scale (alpha / r).
        stride, padding, dilation: as for conv2d, as (h, w) pairs; groups is 1.

    Returns:
        y (N, Cout, OH, OW) in the dtype and memory format of `x`.  Gradients of `lora_a` and
        `lora_b` come back in their own dtype.

    Raises:
        ValueError: if `weight` or `bias` requires grad while autograd is recording — the
            kernels never compute dW or dbias; the dispatcher avoids this case because
            `triton_supports` is False for a trainable weight (a trainable bias it cannot
            see, so that case fails loudly here rather than silently training nothing) —
            or if the call is outside what `triton_supports` accepts.
    """
    if _grad_into_frozen(weight, bias):
        raise ValueError(
            "triton_lora_conv2d keeps the base conv frozen and computes no gradient for its "
            "weight or bias; freeze them (requires_grad_(False)) or use the torch backend.")
    if not triton_supports(x, weight, lora_a, groups=1):
        raise ValueError(
            f"triton_lora_conv2d does not support this call (x {tuple(x.shape)} {x.dtype} on "
            f"{x.device}, weight {tuple(weight.shape)} {weight.dtype}, lora_a "
            f"{tuple(lora_a.shape)} {lora_a.dtype}); check triton_supports first.")
    c_out, rank = weight.shape[0], lora_a.shape[0]
    if tuple(lora_b.shape) != (c_out, rank):
        raise ValueError(f"lora_b must be (Cout, r) = {(c_out, rank)}, got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must be (Cout,) = {(c_out,)}, got {tuple(bias.shape)}")
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out_h = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"convolution output would be empty ({out_h}x{out_w})")
    if x.shape[0] * max(c_out, rank) * out_h * out_w > MAX_ELEMENTS:
        raise ValueError("output too large for the kernels' 32-bit offsets; use the torch backend")
    return _TritonLoraConv2d.apply(x, weight, bias, lora_a, lora_b, float(scaling),
                                   stride, padding, dilation)

