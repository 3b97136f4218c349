"""Triton helpers shared by the forward and backward kernels of the fused LoRA convolution.

Importing this module imports triton; the dispatcher imports the kernels lazily, so a machine
without triton only ever sees the torch path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETING", "MIN_DOT_DIM", "padded_rank", "dot_settings", "memory_format_of", "mma"]


def _interpreter_active() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones (torch < 2.8) read the env directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The `@triton.jit` decorators read TRITON_INTERPRET when their module is imported, so this
# flag is the one that decides whether the kernels run on the CPU through numpy.
INTERPRETING: bool = _interpreter_active()

# Every tl.dot needs each dimension >= 16, so the LoRA rank is padded up to this.
MIN_DOT_DIM = 16


def padded_rank(rank: int) -> int:
    """Rank rounded up to a power of two >= 16, the width of the in-register z tile."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(rank))


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on operands of `dtype`.

    fp32 follows torch's cuDNN switch, because these kernels replace a cuDNN convolution:
    tf32 when torch would use it, exact fp32 otherwise.  Under the interpreter bf16 operands
    are upcast to fp32 before the dot, because the interpreter multiplies bf16 tiles as their
    raw uint16 bits; the upcast is exact and an fp32-accumulated product of bf16 values is
    what the tensor cores compute, so the numerics tested are those of the GPU kernel.
    """
    upcast = INTERPRETING and dtype == torch.bfloat16
    if INTERPRETING or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee", upcast
    return "tf32", upcast


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when `x` is laid out that way (and not also plain contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see `dot_settings` for the two switches)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
