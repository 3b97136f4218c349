"""Backward Triton kernels of the fused LoRA convolution (W and bias frozen: no dW, no dbias).

With g = dL/dy and s = scaling, the backward needs

    dz = s * B^T g                      (N, r, OH, OW)   1x1 conv: cuDNN, in the caller
    dB = s * sum_pixels g z^T           (Cout, r)        1x1 weight grad: cuDNN, in the caller
    dx = convT(g, W) + convT(dz, A)                      `lora_conv2d_input_grad` (Triton)
    dA = sum_pixels dz (x) patches(x)   (r, Cin, kh, kw) `lora_a_weight_grad` (Triton)

Why this split between Triton and cuDNN:
* dz and dB are skinny GEMMs whose cost is one read of g each; cuDNN/cuBLAS already run
  them at memory bandwidth and a fused Triton version saves at most one read of g.
* dx is where fusion pays: the unfused path runs two transposed convolutions and adds two
  input-sized tensors (three extra passes over an input-sized tensor).  Here one kernel
  accumulates both products in fp32 and writes dx once.  Stride > 1 is handled by
  sub-pixel decomposition: programs own input pixels of one phase (ih % sh, iw % sw), for
  which the set of kernel taps that reach an output pixel is the same for every pixel, so
  whole taps are skipped instead of masked (a masked formulation would waste 3/4 of the
  MMA work of a stride-2 layer).
* dA is a weight gradient with only r output rows: cuDNN's weight-gradient kernels are
  tuned for wide outputs and parallelise poorly over r = 4..64 rows.  The Triton kernel
  splits the pixel reduction across programs and sums the per-split partials with
  torch.sum, which keeps dA deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import dot_settings, mma, padded_rank
from .triton_tiles import A_GRAD_TILES, a_grad_configs, conv_configs


@triton.autotune(configs=conv_configs(),
                 key=["C_in", "C_out", "H", "W", "R_PAD", "KH", "KW", "stride_h", "stride_w"])
@triton.jit
def _lora_conv_input_grad_kernel(
    gy_ptr, gz_ptr, w_ptr, a_ptr, gx_ptr,
    N, C_in, H, W, C_out, OH, OW, R,
    sgy_n, sgy_c, sgy_h, sgy_w,
    sgz_n, sgz_c, sgz_h, sgz_w,
    sw_o, sw_i, sw_h, sw_w,
    sa_r, sa_i, sa_h, sa_w,
    sgx_n, sgx_c, sgx_h, sgx_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_n, phase): BLOCK_M input pixels of one stride phase x BLOCK_N
    # input channels of dx.  Reduction over (tap, output-channel block), then the r-wide
    # LoRA term of the same tap.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    phase_h = phase // stride_w
    phase_w = phase % stride_w
    # Input rows ih = phase_h, phase_h + stride_h, ... below H (and columns alike).
    rows = (H - phase_h + stride_h - 1) // stride_h
    cols = (W - phase_w + stride_w - 1) // stride_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    pixel_ok = offs_m < N * rows * cols
    ci_ok = offs_n < C_in
    r_ok = offs_r < R
    # A phase can own no pixels (H < stride_h, e.g. a 1x1 map under a stride-2 conv); its
    # programs store nothing, but must not divide by zero on the way.
    cols = tl.maximum(cols, 1)
    plane = tl.maximum(rows * cols, 1)
    batch = offs_m // plane
    row = (offs_m % plane) // cols
    col = offs_m % cols

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        # Output row oh reaches input row ih = row * stride_h + phase_h through tap kh when
        # oh * stride_h = ih + pad_h - kh * dil_h; the remainder depends only on the phase.
        shift_h = phase_h + pad_h - kh * dil_h
        if shift_h % stride_h == 0:
            oh = row + shift_h // stride_h  # exact division: floor and truncation agree
            row_ok = pixel_ok & (oh >= 0) & (oh < OH)
            for kw in range(KW):
                shift_w = phase_w + pad_w - kw * dil_w
                if shift_w % stride_w == 0:
                    ow = col + shift_w // stride_w
                    tap_ok = row_ok & (ow >= 0) & (ow < OW)
                    # 32-bit offsets stay live; pointers are formed at each load.
                    gy_tap = batch * sgy_n + oh * sgy_h + ow * sgy_w
                    w_tap = kh * sw_h + kw * sw_w + offs_n * sw_i
                    for c0 in range(0, C_out, BLOCK_K):
                        co = c0 + offs_k
                        co_ok = co < C_out
                        g_tile = tl.load(gy_ptr + (gy_tap[:, None] + co[None, :] * sgy_c),
                                         mask=tap_ok[:, None] & co_ok[None, :], other=0.0)
                        w_tile = tl.load(w_ptr + (co[:, None] * sw_o + w_tap[None, :]),
                                         mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
                        acc = mma(g_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                    gz_tile = tl.load(
                        gz_ptr + ((batch * sgz_n + oh * sgz_h + ow * sgz_w)[:, None]
                                  + offs_r[None, :] * sgz_c),
                        mask=tap_ok[:, None] & r_ok[None, :], other=0.0)
                    a_tile = tl.load(
                        a_ptr + (kh * sa_h + kw * sa_w + offs_r[:, None] * sa_r
                                 + offs_n[None, :] * sa_i),
                        mask=r_ok[:, None] & ci_ok[None, :], other=0.0).to(gz_tile.dtype)
                    acc = mma(gz_tile, a_tile, acc, DOT_PRECISION, UPCAST)

    ih = row * stride_h + phase_h
    iw = col * stride_w + phase_w
    gx_ptrs = gx_ptr + (batch * sgx_n + ih * sgx_h + iw * sgx_w)[:, None] + offs_n[None, :] * sgx_c
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=pixel_ok[:, None] & ci_ok[None, :])


def lora_conv2d_input_grad(
    grad_y: Tensor,
    grad_z: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    input_shape: tuple[int, int, int, int],
    memory_format: torch.memory_format,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """dx = conv_transpose(grad_y, W) + conv_transpose(grad_z, A), written once.

    `grad_z` is s * B^T grad_y (already scaled).  dx has the dtype of `grad_y` and the
    given memory format (that of the forward input).
    """
    batch, c_in, height, width = input_shape
    c_out, _, kh, kw = weight.shape
    rank = lora_a.shape[0]
    _, _, out_h, out_w = grad_y.shape
    grad_x = torch.empty(input_shape, device=grad_y.device, dtype=grad_y.dtype,
                         memory_format=memory_format)
    precision, upcast = dot_settings(grad_y.dtype)
    # The largest phase (0, 0) has ceil(H / sh) * ceil(W / sw) pixels per image.
    phase_pixels = batch * triton.cdiv(height, stride[0]) * triton.cdiv(width, stride[1])

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(phase_pixels, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]),
                stride[0] * stride[1])

    _lora_conv_input_grad_kernel[grid](
        grad_y, grad_z, weight, lora_a, grad_x,
        batch, c_in, height, width, c_out, out_h, out_w, rank,
        *grad_y.stride(), *grad_z.stride(), *weight.stride(), *lora_a.stride(), *grad_x.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, R_PAD=padded_rank(rank),
        DOT_PRECISION=precision, UPCAST=upcast,
    )
    return grad_x


# Pixels per split are a multiple of the largest BLOCK_M, so splits never share a tile.
_SPLIT_GRANULE = max(tile.block_m for tile in A_GRAD_TILES)


@triton.autotune(configs=a_grad_configs(),
                 key=["C_in", "OH", "OW", "R_PAD", "KH", "KW", "PIXELS_PER_SPLIT"])
@triton.jit
def _lora_a_grad_kernel(
    x_ptr, gz_ptr, partial_ptr,
    N, C_in, H, W, OH, OW, R,
    sx_n, sx_c, sx_h, sx_w,
    sgz_n, sgz_c, sgz_h, sgz_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    PIXELS_PER_SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (pid_k, pid_s): one tap (kh, kw) x BLOCK_C input channels of dA, reduced over
    # the output pixels of split pid_s; the result is this split's partial sum.
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    channel_blocks = tl.cdiv(C_in, BLOCK_C)
    tap = pid_k // channel_blocks
    kh = tap // KW
    kw = tap % KW
    offs_c = (pid_k % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R_PAD)
    ci_ok = offs_c < C_in
    r_ok = offs_r < R

    pixels = N * OH * OW
    start = pid_s * PIXELS_PER_SPLIT
    end = tl.minimum(start + PIXELS_PER_SPLIT, pixels)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pixel_ok = offs_m < end
        batch = offs_m // (OH * OW)
        oh = (offs_m % (OH * OW)) // OW
        ow = offs_m % OW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        tap_ok = pixel_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # dz is loaded transposed, (r, pixels), so the dot yields dA's (r, channels) tile.
        gz_t = tl.load(gz_ptr + (offs_r[:, None] * sgz_c
                                 + (batch * sgz_n + oh * sgz_h + ow * sgz_w)[None, :]),
                       mask=r_ok[:, None] & pixel_ok[None, :], other=0.0)
        patches = tl.load(x_ptr + ((batch * sx_n + ih * sx_h + iw * sx_w)[:, None]
                                   + offs_c[None, :] * sx_c),
                          mask=tap_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = mma(gz_t, patches, acc, DOT_PRECISION, UPCAST)

    # partial is contiguous (splits, R, C_in, KH, KW), the layout of lora_a itself.
    out = (partial_ptr + pid_s * R * C_in * KH * KW + offs_r[:, None] * (C_in * KH * KW)
           + offs_c[None, :] * (KH * KW) + kh * KW + kw)
    tl.store(out, acc, mask=r_ok[:, None] & ci_ok[None, :])


def _split_count_target(device: torch.device) -> int:
    """How many programs the dA reduction should spread over: a few waves of the GPU."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: programs run one after another, few is fastest


def lora_a_weight_grad(
    x: Tensor,
    grad_z: Tensor,
    lora_a_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """dA[r, c, kh, kw] = sum over output pixels p of grad_z[r, p] * patch(x)[p, c, kh, kw].

    Returned in fp32 (the caller casts to the adapter's dtype).  The pixel reduction is split
    so that taps x channel blocks x splits fills the GPU even when Cin is small.
    """
    rank, c_in, kh, kw = lora_a_shape
    batch, _, height, width = x.shape
    _, _, out_h, out_w = grad_z.shape
    pixels = batch * out_h * out_w
    # Program count along the taps/channels axis at BLOCK_C = 64 (most dA tiles); enough
    # splits to reach the target, each a whole number of granules.
    channel_programs = kh * kw * triton.cdiv(c_in, 64)
    wanted_splits = max(1, triton.cdiv(_split_count_target(x.device), channel_programs))
    per_split = triton.cdiv(triton.cdiv(pixels, wanted_splits), _SPLIT_GRANULE) * _SPLIT_GRANULE
    splits = triton.cdiv(pixels, per_split)
    partial = torch.empty((splits, rank, c_in, kh, kw), device=x.device, dtype=torch.float32)
    precision, upcast = dot_settings(x.dtype)

    def grid(meta: dict) -> tuple[int, int]:
        return (kh * kw * triton.cdiv(c_in, meta["BLOCK_C"]), splits)

    _lora_a_grad_kernel[grid](
        x, grad_z, partial,
        batch, c_in, height, width, out_h, out_w, rank,
        *x.stride(), *grad_z.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        per_split,
        KH=kh, KW=kw, R_PAD=padded_rank(rank),
        DOT_PRECISION=precision, UPCAST=upcast,
    )
    # Summing the partials in a fixed order keeps dA bit-reproducible from run to run.
    return partial[0] if splits == 1 else partial.sum(dim=0)
