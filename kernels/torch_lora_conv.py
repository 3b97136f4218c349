"""The torch LoRA conv path: y = conv(x, W, bias) + scaling * conv(x, B @ A), on any device.

By linearity y = conv(x, W_eff, bias) with W_eff = W + scaling * B @ A. Each route below is
kept because its saving is structural (fewer passes or fewer multiply-adds on any machine),
not because a threshold was tuned on one:

* y and dx: one conv and one transposed conv with W_eff, the very calls the frozen layer
  makes, so the LoRA step's dominant cost is the frozen floor's by construction (peft-style
  LoRA adds two convs and an activation-sized sum instead).
* u = conv(x, A) (saved for dB) and dA: convolutions with only r output channels. For 1x1
  stride-1 convs they are batched GEMMs over x's per-image planes (NCHW) or pixel rows
  (channels-last), which is all a 1x1 conv is; the conv library would first convert x's layout
  for r output channels (tf_efficientnet_lite0 at 128 px, NCHW: 1.137x -> 1.120x the frozen
  floor on 2 threads; a layout pass avoided on any CPU).
* Every tensor this path makes keeps its neighbours' memory layout (W_eff W's, u and B^T dy the
  activations'): a layout switch would cost a conversion of a whole activation in the next op.
* dz = scaling * B^T dy and dB = scaling * sum dy u^T: GEMMs over the channel axis.
* Narrow layers take dA and dB from the frozen W's full gradient (dA = scaling * B^T dW,
  dB = scaling * dW A^T) when that one GEMM has fewer multiply-adds per pixel,
  Cout * Cin*kh*kw, than the three rank-r products, r * (2 Cout + Cin*kh*kw): a count, not a
  timing (it picks tf_efficientnet_lite0's 16 -> 96 expansions, never resnet's convs).
* groups > 1 (grouped, depthwise): one grouped conv with W_eff; autograd takes the small
  weight gradient on to A and B.

W_eff is merged on every call, in evaluation too: merging costs r / (N * OH * OW) of the
conv's multiply-adds (0.02 % at batch 32 and 32x32 pixels), so a cache would save nothing
measurable, and it would have to notice in-place updates that fused optimizers make without
bumping version counters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["torch_lora_conv2d", "grouped_lora_conv2d", "lora_delta_weight", "effective_weight"]


def lora_delta_weight(weight_shape: torch.Size | tuple[int, ...], lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """B @ A as a conv weight of `weight_shape` (unscaled): W's exact shape for any groups."""
    return (lora_b @ lora_a.reshape(lora_a.shape[0], -1)).reshape(weight_shape)


def _rows(t: Tensor) -> Tensor:
    """A conv weight (O, I, kh, kw) as the (O, kh*kw*I) or (O, I*kh*kw) matrix its memory already
    holds (channels-last or contiguous): a view, no copy."""
    if _is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def effective_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """W + scaling * B @ A in `dtype` and in W's memory layout, accumulated in fp32 for 16-bit
    weights (no autograd).

    The product is formed on the rows W's memory holds, so W_eff comes out in W's layout without
    a transposing copy (ResNet-18's 512x512x3x3 weights: 4.5 ms each way on 2 CPU threads). The
    layout matters because a convolution's output takes its weight's: an NCHW W_eff in a
    channels-last model would turn the activations after it back to NCHW.
    """
    with torch.no_grad():
        compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        layout = _layout_of(weight)
        flat = torch.addmm(_rows(weight).to(compute), lora_b.to(compute),
                           _rows(lora_a.contiguous(memory_format=layout)).to(compute), alpha=scaling)
        out, cin, kh, kw = weight.shape
        if layout == torch.channels_last:
            return flat.to(dtype).view(out, kh, kw, cin).permute(0, 3, 1, 2)
        return flat.to(dtype).view(weight.shape)


def _is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _layout_of(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def _is_pointwise(x: Tensor, weight: Tensor, stride, padding) -> bool:
    """1x1, stride 1, no padding, x dense in NCHW or channels-last: the conv is a GEMM over x's
    planes (NCHW) or pixel rows (channels-last)."""
    return (weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and (x.is_contiguous() or _is_channels_last(x)))


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    return F.conv2d(x, weight.to(x.dtype), bias if bias is None else bias.to(x.dtype), stride, padding, dilation)


def _adapter_grads_from_weight_grad(weight: Tensor, rank: int) -> bool:
    """Whether dA and dB take fewer multiply-adds through dW (Cout x Cin*kh*kw per pixel) than
    through the rank-r products B^T dy, dA and dy u^T (r x (2 Cout + Cin*kh*kw) per pixel)."""
    cout, cin, kh, kw = weight.shape
    taps = cin * kh * kw
    return cout * taps <= rank * (2 * cout + taps)


class _LoRAConv2dFunction(torch.autograd.Function):
    """groups == 1 LoRA conv with W_eff forward and backward; no gradient for a frozen W."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, w_eff):  # type: ignore[override]
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        pointwise = _is_pointwise(x, weight, stride, padding)
        # need_w: someone unfroze W. Then, or when it is cheaper, dA and dB follow from dW.
        from_weight_grad = need_w or ((need_a or need_b) and _adapter_grads_from_weight_grad(weight, lora_a.shape[0]))
        u = None
        if need_b and not from_weight_grad:
            if pointwise:
                u = _channel_product(x, lora_a.to(x.dtype).view(lora_a.shape[0], -1).t())
            else:
                u = _conv(x, lora_a, None, stride, padding, dilation)
        y = _conv(x, w_eff, bias, stride, padding, dilation)
        ctx.scaling, ctx.stride, ctx.padding, ctx.dilation = scaling, stride, padding, dilation
        ctx.pointwise, ctx.from_weight_grad = pointwise, from_weight_grad
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(x, w_eff, lora_a, lora_b, u)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, w_eff, lora_a, lora_b, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        weight_dtype, bias_dtype, lora_a_dtype, lora_b_dtype = ctx.dtypes
        scaling, dtype = ctx.scaling, grad_y.dtype
        rank, cout = lora_a.shape[0], w_eff.shape[0]
        conv_args = (None, ctx.stride, ctx.padding, ctx.dilation, False, (0, 0), 1)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None

        if ctx.from_weight_grad:
            # dW_eff is dW (returned only if W trains), and A's and B's gradients follow from it.
            grad_x, grad_eff, _ = torch.ops.aten.convolution_backward(
                grad_y, x, w_eff, *conv_args, (need_x, True, False))
            grad_flat = grad_eff.reshape(cout, -1).float()
            grad_w = grad_eff if need_w else None
            if need_a:
                grad_a = (lora_b.float().t() @ grad_flat * scaling).view(lora_a.shape)
            if need_b:
                grad_b = grad_flat @ lora_a.float().reshape(rank, -1).t() * scaling
        else:
            if need_b:
                grad_b = _channel_outer(grad_y, u) * scaling
            if need_a:
                grad_u = _channel_product(grad_y, (lora_b * scaling).to(dtype))  # scaling * B^T dy
                if ctx.pointwise:
                    grad_a = _channel_outer(grad_u, x).reshape(lora_a.shape)
                else:
                    grad_a = torch.ops.aten.convolution_backward(
                        grad_u, x, lora_a.to(dtype), *conv_args, (False, True, False))[1]
            if need_x:
                grad_x = torch.ops.aten.convolution_backward(
                    grad_y, x, w_eff, *conv_args, (True, False, False))[0]
        if need_bias:
            grad_bias = grad_y.sum((0, 2, 3)).to(bias_dtype)
        return (
            grad_x,
            grad_w.to(weight_dtype) if grad_w is not None else None,
            grad_bias,
            grad_a.reshape(lora_a.shape).to(lora_a_dtype) if grad_a is not None else None,
            grad_b.to(lora_b_dtype) if grad_b is not None else None,
            None, None, None, None, None,
        )


def _planes(t: Tensor) -> Tensor:
    """(N, C, H*W) view of a 4-D tensor, without a copy for NCHW and channels-last tensors (the
    channels-last view is transposed: MKL's batched GEMM reads either orientation)."""
    n, c, h, w = t.shape
    if _is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c).transpose(1, 2)
    return t.contiguous().view(n, c, h * w)


def _channel_product(t: Tensor, matrix: Tensor) -> Tensor:
    """matrix^T applied on the channel axis: (N, C, H, W) with matrix (C, r) -> (N, r, H, W), in
    the layout of `t` (an NCHW u or B^T dy next to channels-last activations made the conv
    library convert the activations for dA: 3.4 ms for one 64-channel ResNet-18 layer).

    One GEMM per image, with an explicit bmm over the expanded matrix (torch.matmul may copy the
    operand to fold the batch into one GEMM); on 2 CPU threads this took 7.7-7.9 ms against
    11.6 ms for one GEMM over all pixel rows of channels-last tf_efficientnet_lite0 gradients.
    """
    n, c, h, w = t.shape
    if _is_channels_last(t):
        rows = t.permute(0, 2, 3, 1).reshape(n, h * w, c)
        return torch.bmm(rows, matrix.expand(n, -1, -1)).view(n, h, w, -1).permute(0, 3, 1, 2)
    return torch.bmm(matrix.t().expand(n, -1, -1), t.contiguous().view(n, c, h * w)).view(n, -1, h, w)


def _channel_outer(a: Tensor, b: Tensor) -> Tensor:
    """sum over batch and pixels of a b^T: (N, Ca, H, W), (N, Cb, H, W) -> (Ca, Cb) in fp32,
    for any mix of NCHW and channels-last operands."""
    a, b = _planes(a), _planes(b)
    # The operand with fewer rows first: the GEMMs run about 2x faster (u of rank 8 against dy,
    # or a narrow layer's x against its dy), so b a^T is computed and transposed when b is smaller.
    if b.shape[1] < a.shape[1]:
        return torch.bmm(b, a.transpose(1, 2)).sum(0, dtype=torch.float32).t()
    return torch.bmm(a, b.transpose(1, 2)).sum(0, dtype=torch.float32)


def grouped_lora_conv2d(
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
    """LoRA for grouped/depthwise convs: one grouped conv with W + scaling * B @ A.

    A is (r, Cin / groups, kh, kw) and B (Cout, r), so B @ A has W's exact shape. W_eff is
    small (depthwise: Cout * kh * kw) and its gradient is one grouped weight-gradient conv
    that autograd takes on to A and B through the matmul.
    """
    delta = lora_delta_weight(weight.shape, lora_a, lora_b)
    merged = torch.add(weight, delta, alpha=scaling).contiguous(memory_format=_layout_of(weight))  # see effective_weight
    return F.conv2d(x, merged.to(x.dtype), bias if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


def torch_lora_conv2d(
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
    """conv2d(x, W, bias) + scaling * conv2d(x, B @ A) on the torch path (any device).

    Differentiable in every tensor argument; the frozen W's gradient is computed only when W
    requires grad. Without autograd (evaluation) it is one conv with W_eff.
    """
    if groups != 1:
        return grouped_lora_conv2d(x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b))
    w_eff = effective_weight(weight, lora_a, lora_b, scaling, x.dtype)
    if not tracked:
        return _conv(x, w_eff, bias, stride, padding, dilation)
    return _LoRAConv2dFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), stride, padding, dilation, w_eff)
