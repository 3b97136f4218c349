"""The fast torch path for LoRA conv2d: y = conv(x, W, bias) + scaling * conv(x, B @ A).

By linearity y = conv(x, W + scaling * B @ A, bias): the forward output and the input
gradient each take one convolution with the *effective* weight W_eff, exactly like the frozen
layer's own forward and backward, with no activation-sized intermediate. The adapter adds only
rank-r work:

    forward   u  = conv(x, A)                  (N, r, OH, OW), saved for dB
    backward  dx = conv_transpose(dy, W_eff)   one call, no weight gradient
              gu = scaling * B^T dy            (N, r, OH, OW)
              dA = weight-gradient(x, gu)      r rows only
              dB = scaling * sum dy u^T        a GEMM

W's gradient is never computed unless W itself requires grad (then dW = dW_eff, and dA, dB
follow from it by the chain rule in one weight-gradient call).

Why not one conv with [W; A] stacked on the output channels (one read of x): on CPU it was
slower (resnet18 layer1 at 128 px, batch 32: 1.7x the frozen conv against 1.3x here), because
Cout + r is rarely a multiple of oneDNN's 16-channel blocks and splitting the stacked output
costs an output-sized copy; a fresh allocation of 32 MiB or more also page-faults on every
step (about 0.4 ms per MiB here), so extra activation-sized tensors are the thing to avoid.

1x1 stride-1 convs over large images run as batched GEMMs on the NCHW planes instead of
oneDNN convs: that skips oneDNN's NCHW <-> blocked reorders (tf_efficientnet_lite0's first
16 -> 96 expansion: 0.7x the frozen conv's time). Their rank-r products (u and dA) are batched
GEMMs at every image size: a oneDNN conv with r = 8 output channels pays the same reorders for
almost no arithmetic (whole tf_efficientnet_lite0 step: 1.137x -> 1.120x the frozen floor).

Stride-1 k x k convs on CPU compute u and dA as tap-stacked GEMMs over x's NCHW planes
(tap_gemm.py), strided 1x1 convs without padding (resnet downsamples) as the pointwise GEMMs on
x[:, :, ::s, ::s]: both skip the oneDNN reorder of the whole input that an r-channel conv pays
(whole resnet18 step with glibc's default malloc: 1.10x -> 1.04-1.07x the frozen floor).

Narrow layers take dA and dB from the frozen W's full gradient instead (dA = scaling * B^T dW,
dB = scaling * dW A^T), which then needs no u: when Cout * Cin*kh*kw is at most about the rank-r
products' r * (2 Cout + Cin*kh*kw), one well-shaped GEMM beats three with r rows, which run at half
the speed (tf_efficientnet_lite0's 16 -> 96 expansion at 64x64 px: backward 9.7 -> 5.1 ms for the
adapter; whole step 1.09-1.14x -> 1.07x the frozen floor).

W_eff is built once per training forward and, for evaluation, cached per adapter until W
(version counter), A or B (values) change.

groups > 1 (grouped, depthwise) uses `grouped_lora_conv2d`: one grouped conv with W_eff, with
autograd taking the (small) weight gradient on to A and B.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .tap_gemm import tap_gemm_conv2d, tap_gemm_weight_grad

__all__ = ["torch_lora_conv2d", "grouped_lora_conv2d", "lora_delta_weight"]

# 1x1 convs with at least this many pixels per image take the GEMM route. Measured on
# tf_efficientnet_lite0's 1x1 convs (batch 32, two threads), forward and input gradient:
# GEMMs win from 8x8 up (0.1-0.9x the oneDNN time at 16x16 and above, 0.8-1.0x at 8x8) and
# lose at 4x4 (1.2-1.5x slower).
GEMM_1X1_MIN_PIXELS = 64

# When the frozen W's full gradient costs at most this many times the arithmetic of the rank-r
# gradient products, the adapter gradients are taken from it instead (dA = s B^T dW, dB = s dW A^T):
# one well-shaped GEMM beats three with r = 8 rows, which run at half the speed. This is the case for
# narrow layers such as tf_efficientnet_lite0's 16 -> 96 expansion at 64x64 px (backward 9.7 -> 5.1 ms).
WEIGHT_GRAD_COST_RATIO = 1.5

# Stride-1 k x k convs on CPU with at least this many pixels per image compute their rank-r
# products (u and dA) as tap-stacked GEMMs (see tap_gemm.py): faster from 8x8 up, not at 4x4.
TAP_GEMM_MIN_PIXELS = 64


def lora_delta_weight(weight_shape: torch.Size | tuple[int, ...], lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """B @ A as a conv weight of `weight_shape` (unscaled): W's exact shape for any groups."""
    return (lora_b @ lora_a.reshape(lora_a.shape[0], -1)).reshape(weight_shape)


def _version_key(tensor: Tensor) -> tuple[int, int] | None:
    """(storage address, version counter); None for inference tensors, which have no counter."""
    try:
        return (tensor.data_ptr(), tensor._version)
    except RuntimeError:
        return None


@dataclass
class _CachedWeight:
    weight_source: weakref.ref  # W (A is the cache key)
    key: tuple                  # W's (address, version), scaling, dtype, device
    lora_a: Tensor              # copies of A and B as they were when `merged` was built
    lora_b: Tensor
    merged: Tensor


# Keyed by the lora_a tensor itself (by identity), so entries die with their adapter.
_effective_weights: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _merge(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        flat = torch.addmm(weight.reshape(weight.shape[0], -1).to(compute), lora_b.to(compute),
                           lora_a.reshape(lora_a.shape[0], -1).to(compute), alpha=scaling)
        return flat.reshape(weight.shape).to(dtype)


def effective_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, dtype: torch.dtype,
                     reuse: bool = True) -> Tensor:
    """W + scaling * B @ A in `dtype` (no autograd).

    With `reuse` (evaluation) it comes from a cache while the frozen W is unchanged (its version
    counter) and A and B hold the values it was built from. A and B are compared by value, not by
    version counter: fused optimizers (AdamW(fused=True)) update parameters in place without
    bumping it. The comparison reads r * (Cin*kh*kw + Cout) numbers, a small fraction of the
    r * Cout * Cin*kh*kw multiply-adds of rebuilding. A trainable W is never cached.
    """
    if not reuse or weight.requires_grad:
        return _merge(weight, lora_a, lora_b, scaling, dtype)
    weight_version = _version_key(weight)
    key = (weight_version, float(scaling), dtype, weight.device)
    entry = _effective_weights.get(lora_a)
    if (entry is not None and weight_version is not None and entry.key == key and entry.weight_source() is weight
            and torch.equal(entry.lora_a, lora_a) and torch.equal(entry.lora_b, lora_b)):
        return entry.merged
    merged = _merge(weight, lora_a, lora_b, scaling, dtype)
    if weight_version is not None:
        # A fresh tensor each time (never refreshed in place): graphs that saved the old one stay valid.
        _effective_weights[lora_a] = _CachedWeight(weakref.ref(weight), key, lora_a.detach().clone(),
                                                   lora_b.detach().clone(), merged)
    return merged


def _is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _is_pointwise(x: Tensor, weight: Tensor, stride, padding) -> bool:
    return (weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and x.is_contiguous())


def _uses_gemm(x: Tensor, weight: Tensor, stride, padding, out_pixels: int) -> bool:
    return _is_pointwise(x, weight, stride, padding) and out_pixels >= GEMM_1X1_MIN_PIXELS


def _effective_conv(x: Tensor, w_eff: Tensor, bias: Tensor | None, stride, padding, dilation, gemm: bool) -> Tensor:
    """conv2d(x, W_eff, bias): batched GEMMs on the NCHW planes on the 1x1 GEMM route, else F.conv2d."""
    if not gemm:
        return F.conv2d(x, w_eff, bias if bias is None else bias.to(x.dtype), stride, padding, dilation)
    n, cin, height, width = x.shape
    y = _batched_left_product(w_eff.view(w_eff.shape[0], cin), x.view(n, cin, height * width)).view(n, -1, height, width)
    return y if bias is None else y.add_(bias.to(y.dtype).view(1, -1, 1, 1))


def _rank_route(x: Tensor, weight: Tensor, stride, padding) -> str:
    """How the rank-r products u = conv(x, A) and dA are computed.

    "pointwise": 1x1 stride 1, batched GEMMs on x's planes; "subsampled": 1x1 strided with no
    padding on CPU (resnet downsamples), the same GEMMs on x[:, :, ::s, ::s], a quarter-size
    copy instead of oneDNN's reorder of all of x; "taps": stride-1 k x k on CPU, tap-stacked
    GEMMs (tap_gemm.py); "conv": oneDNN/cuDNN convolutions.
    """
    if _is_pointwise(x, weight, stride, padding):
        return "pointwise"
    on_cpu_nchw = x.device.type == "cpu" and x.is_contiguous()
    if on_cpu_nchw and weight.shape[2:] == (1, 1) and tuple(padding) == (0, 0):
        return "subsampled"
    if on_cpu_nchw and tuple(stride) == (1, 1) and x.shape[2] * x.shape[3] >= TAP_GEMM_MIN_PIXELS:
        return "taps"
    return "conv"


def _adapter_grads_from_weight_grad(weight: Tensor, rank: int) -> bool:
    """Whether dA and dB are cheaper through dW (Cout x Cin*kh*kw per pixel) than through the
    rank-r products B^T dy, dA and dy u^T (r x (2 Cout + Cin*kh*kw) per pixel)."""
    cout, cin, kh, kw = weight.shape
    taps = cin * kh * kw
    return cout * taps <= WEIGHT_GRAD_COST_RATIO * rank * (2 * cout + taps)


class _LoRAConv2dFunction(torch.autograd.Function):
    """groups == 1 LoRA conv with W_eff forward and backward; no gradient for a frozen W."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, w_eff):  # type: ignore[override]
        n = x.shape[0]
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        route = _rank_route(x, weight, stride, padding)
        gemm = _uses_gemm(x, weight, stride, padding, x.shape[2] * x.shape[3])
        # need_w: someone unfroze W. Then, or when it is cheaper, dA and dB follow from dW.
        from_weight_grad = need_w or ((need_a or need_b) and _adapter_grads_from_weight_grad(weight, lora_a.shape[0]))
        # The input the rank-r products read: x, or for "subsampled" the pixels a strided 1x1 sees.
        subsample = route == "subsampled" and not from_weight_grad and (need_a or need_b)
        rank_x = x[:, :, ::stride[0], ::stride[1]].contiguous() if subsample else x
        u = None
        if need_b and not from_weight_grad:
            if route in ("pointwise", "subsampled"):
                rows, out_h, out_w = rank_x.shape[1:]
                u = _batched_left_product(lora_a.to(x.dtype).view(lora_a.shape[0], rows),
                                          rank_x.view(n, rows, out_h * out_w)).view(n, -1, out_h, out_w)
            elif route == "taps":
                u = tap_gemm_conv2d(x, lora_a, stride, padding, dilation)
            else:
                u = F.conv2d(x, lora_a.to(x.dtype), None, stride, padding, dilation)
        # After u, not before: x is still in cache from the layer that wrote it (0.5 ms less at
        # resnet18's 64-channel 32x32 convs).
        y = _effective_conv(x, w_eff, bias, stride, padding, dilation, gemm)
        ctx.scaling, ctx.stride, ctx.padding, ctx.dilation, ctx.gemm = scaling, stride, padding, dilation, gemm
        ctx.route, ctx.from_weight_grad = route, from_weight_grad
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(x, w_eff, lora_a, lora_b, u, rank_x if subsample else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, w_eff, lora_a, lora_b, u, subsampled_x = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        weight_dtype, bias_dtype, lora_a_dtype, lora_b_dtype = ctx.dtypes
        scaling, dtype = ctx.scaling, grad_y.dtype
        rank, cout = lora_a.shape[0], w_eff.shape[0]
        conv_args = (None, ctx.stride, ctx.padding, ctx.dilation, False, (0, 0), 1)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.gemm:
            grad_y = grad_y.contiguous()
        n, _, out_h, out_w = grad_y.shape

        if ctx.from_weight_grad:
            # dW_eff is dW (returned only if W trains), and A's and B's gradients follow from it.
            if ctx.gemm:
                grad_x, grad_eff = _gemm_backward(grad_y, x, w_eff, need_x, True)
            else:
                grad_x, grad_eff, _ = torch.ops.aten.convolution_backward(
                    grad_y, x, w_eff, *conv_args, (need_x, True, False))
            grad_flat = grad_eff.reshape(cout, -1).float()
            grad_w = grad_eff if need_w else None
            if need_a:
                grad_a = (lora_b.float().t() @ grad_flat * scaling).view(lora_a.shape)
            if need_b:
                grad_b = grad_flat @ lora_a.float().reshape(rank, -1).t() * scaling
        else:
            # The rank-r products first, while dy is still in cache from the op that wrote it, then
            # dx (0.9 ms less at resnet18's 64-channel 32x32 convs).
            if need_b:
                grad_b = _channel_outer(grad_y, u) * scaling
            if need_a:
                grad_u = _channel_product(grad_y, (lora_b * scaling).to(dtype))  # scaling * B^T dy
                if ctx.route == "pointwise":
                    grad_a = _gemm_backward(grad_u, x, lora_a, False, True)[1]
                elif ctx.route == "subsampled":
                    grad_a = _gemm_backward(grad_u, subsampled_x, lora_a, False, True)[1]
                elif ctx.route == "taps":
                    grad_a = tap_gemm_weight_grad(grad_u, x, tuple(lora_a.shape[2:]), ctx.stride, ctx.padding, ctx.dilation)
                else:
                    grad_a = torch.ops.aten.convolution_backward(
                        grad_u, x, lora_a.to(dtype), *conv_args, (False, True, False))[1]
            if need_x:
                if ctx.gemm:
                    grad_x = _gemm_backward(grad_y, x, w_eff, True, False)[0]
                else:
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


def _batched_left_product(matrix: Tensor, planes: Tensor) -> Tensor:
    """matrix @ planes[i] for every i: (M, K) and (N, K, P) -> (N, M, P).

    An explicit bmm over the expanded matrix: torch.matmul may fold the batch into one GEMM
    by copying `planes` (seen for rank-sized matrices).
    """
    return torch.bmm(matrix.expand(planes.shape[0], -1, -1), planes)


def _channel_product(t: Tensor, matrix: Tensor) -> Tensor:
    """matrix^T applied on the channel axis: (N, C, H, W) with matrix (C, r) -> (N, r, H, W)."""
    n, c, h, w = t.shape
    if _is_channels_last(t):
        rows = t.permute(0, 2, 3, 1).reshape(-1, c) @ matrix
        return rows.view(n, h, w, -1).permute(0, 3, 1, 2)
    return _batched_left_product(matrix.t(), t.contiguous().view(n, c, h * w)).view(n, -1, h, w)


def _channel_outer(a: Tensor, b: Tensor) -> Tensor:
    """sum over batch and pixels of a b^T: (N, Ca, H, W), (N, Cb, H, W) -> (Ca, Cb) in fp32."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    if _is_channels_last(a) and _is_channels_last(b):
        return (a.permute(0, 2, 3, 1).reshape(-1, ca).t() @ b.permute(0, 2, 3, 1).reshape(-1, cb)).float()
    a, b = a.contiguous().view(n, ca, h * w), b.contiguous().view(n, cb, h * w)
    # The operand with fewer rows first: the GEMMs run about 2x faster (u of rank 8 against dy,
    # or a narrow layer's x against its dy), so b a^T is computed and transposed when b is smaller.
    if cb < ca:
        return torch.bmm(b, a.transpose(1, 2)).sum(0, dtype=torch.float32).t()
    return torch.bmm(a, b.transpose(1, 2)).sum(0, dtype=torch.float32)


def _gemm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """convolution_backward for a 1x1 stride-1 conv on contiguous NCHW tensors, as GEMMs."""
    n, cin, h, w = x.shape
    cout = grad_out.shape[1]
    grad_planes = grad_out.contiguous().view(n, cout, h * w)
    grad_input = grad_weight = None
    if need_input:
        grad_input = _batched_left_product(weight.reshape(cout, cin).t().to(grad_out.dtype), grad_planes).view(n, cin, h, w)
    if need_weight:
        grad_weight = _channel_outer(grad_out, x).reshape(cout, cin, 1, 1)
    return grad_input, grad_weight


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
    merged = torch.add(weight, delta, alpha=scaling)
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
    requires grad. Without autograd (evaluation) it is one conv with the cached W_eff.
    """
    if groups != 1:
        return grouped_lora_conv2d(x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b))
    # In training A and B change every step, so W_eff is built fresh; evaluation reuses it.
    w_eff = effective_weight(weight, lora_a, lora_b, scaling, x.dtype, reuse=not tracked)
    if not tracked:
        gemm = _uses_gemm(x, weight, stride, padding, x.shape[2] * x.shape[3])
        return _effective_conv(x, w_eff, bias, stride, padding, dilation, gemm)
    return _LoRAConv2dFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), stride, padding, dilation, w_eff)
