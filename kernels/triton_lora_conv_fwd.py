"""Forward Triton kernel of the fused LoRA convolution.

    y = conv2d(x, W, bias) + scaling * B @ conv2d(x, A)        (groups = 1)

One implicit-GEMM pass over the input: GEMM rows are output pixels (N * OH * OW), GEMM
columns are output channels, and the reduction runs over (kh, kw, input-channel block).
Every program multiplies its tile of input patches by a tile of W *and* by the whole of A,
so the rank-r projection z = conv2d(x, A) of its pixels is ready in registers when the
main loop ends; the epilogue adds scaling * z @ B^T and the bias and writes y once.

Why recompute z in every output-channel tile instead of running a first pass for it:
the extra work is r_pad / BLOCK_N of the main loop (16 / 128 = 12.5 % at the largest tile,
on tensor cores, with the input tile already in shared memory), whereas a separate pass
would read the whole input a second time and then read z back.  The backward needs z
(for dB), so the programs of the first output-channel tile also store it: one small write
(r channels) instead of a second pass.

Why W and the adapter are not merged into W + scaling * B @ A: in bf16 / fp16 the merged
weight rounds the adapter's contribution away whenever it is smaller than the weight's
last bit, which is exactly the regime of early LoRA training (B starts at zero).  Keeping
the two GEMMs apart with fp32 accumulators keeps the adapter signal, like the unfused path.

Shared helpers live in `triton_common`, the tile table in `triton_tiles`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .conv_shape import conv_output_size
from .triton_common import dot_settings, memory_format_of, mma, padded_rank
from .triton_tiles import conv_configs


@triton.autotune(configs=conv_configs(), key=["C_in", "C_out", "OH", "OW", "R_PAD", "KH", "KW"])
@triton.jit
def _lora_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, z_ptr,
    N, C_in, H, W, C_out, OH, OW, R,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sa_r, sa_i, sa_h, sa_w,
    sb_o, sb_r,
    sy_n, sy_c, sy_h, sy_w,
    sz_n, sz_c, sz_h, sz_w,
    scaling,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_n): BLOCK_M output pixels x BLOCK_N output channels of y.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)

    pixel_ok = offs_m < N * OH * OW
    n_ok = offs_n < C_out
    r_ok = offs_r < R
    batch = offs_m // (OH * OW)
    oh = (offs_m % (OH * OW)) // OW
    ow = offs_m % OW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # Taps outside, channel blocks inside: the padding mask and the pixel addresses are
    # computed once per tap, and the inner loop only strides along input channels (the
    # contiguous axis of channels_last activations and of channels_last weights).
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        row_ok = pixel_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            tap_ok = row_ok & (iw >= 0) & (iw < W)
            # 32-bit offsets stay live across the loop; pointers are formed at each load
            # (live 64-bit pointer tiles cost twice the registers).
            x_tap = batch * sx_n + ih * sx_h + iw * sx_w
            w_tap = kh * sw_h + kw * sw_w + offs_n * sw_o
            a_tap = kh * sa_h + kw * sa_w + offs_r * sa_r
            for c0 in range(0, C_in, BLOCK_K):
                ci = c0 + offs_k
                ci_ok = ci < C_in
                patches = tl.load(x_ptr + (x_tap[:, None] + ci[None, :] * sx_c),
                                  mask=tap_ok[:, None] & ci_ok[None, :], other=0.0)
                w_tile = tl.load(w_ptr + (ci[:, None] * sw_i + w_tap[None, :]),
                                 mask=ci_ok[:, None] & n_ok[None, :], other=0.0)
                a_tile = tl.load(a_ptr + (ci[:, None] * sa_i + a_tap[None, :]),
                                 mask=ci_ok[:, None] & r_ok[None, :], other=0.0).to(patches.dtype)
                acc = mma(patches, w_tile, acc, DOT_PRECISION, UPCAST)
                acc_z = mma(patches, a_tile, acc_z, DOT_PRECISION, UPCAST)

    if STORE_Z:
        # Every output-channel tile computed the same z; the first one saves it for dB.
        if pid_n == 0:
            z_ptrs = (z_ptr + (batch * sz_n + oh * sz_h + ow * sz_w)[:, None]
                      + offs_r[None, :] * sz_c)
            tl.store(z_ptrs, acc_z.to(z_ptr.dtype.element_ty),
                     mask=pixel_ok[:, None] & r_ok[None, :])

    # Epilogue: y += (scaling * z) @ B^T.  z is rounded to the activation dtype first, as
    # the unfused path's z is, so the product runs on tensor cores in the input precision.
    b_tile = tl.load(b_ptr + offs_r[:, None] * sb_r + offs_n[None, :] * sb_o,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(y_ptr.dtype.element_ty)
    scaled_z = (acc_z * scaling).to(y_ptr.dtype.element_ty)
    acc = mma(scaled_z, b_tile, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + (batch * sy_n + oh * sy_h + ow * sy_w)[:, None] + offs_n[None, :] * sy_c
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=pixel_ok[:, None] & n_ok[None, :])


def lora_conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    save_z: bool,
) -> tuple[Tensor, Tensor | None]:
    """Launch the fused forward; returns (y, z) with z = conv2d(x, A) if `save_z`, else None.

    Inputs are read through their strides (NCHW or channels_last, no copies); y and z are
    allocated in the memory format of `x`.  The LoRA tensors and the bias may be in another
    float dtype than `x` and are cast tile by tile to the activation dtype, as autocast does.
    """
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    rank = lora_a.shape[0]
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    memory_format = memory_format_of(x)
    y = torch.empty((batch, c_out, out_h, out_w), device=x.device, dtype=x.dtype,
                    memory_format=memory_format)
    z = (torch.empty((batch, rank, out_h, out_w), device=x.device, dtype=x.dtype,
                     memory_format=memory_format) if save_z else None)
    z_arg = z if z is not None else y  # never written when STORE_Z is False
    precision, upcast = dot_settings(x.dtype)
    pixels = batch * out_h * out_w

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))

    _lora_conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, lora_a, lora_b, y, z_arg,
        batch, c_in, height, width, c_out, out_h, out_w, rank,
        *x.stride(), *weight.stride(), *lora_a.stride(), *lora_b.stride(),
        *y.stride(), *z_arg.stride(),
        float(scaling),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, R_PAD=padded_rank(rank),
        HAS_BIAS=bias is not None, STORE_Z=save_z,
        DOT_PRECISION=precision, UPCAST=upcast,
    )
    return y, z
