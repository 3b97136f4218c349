"""Convolution geometry shared by every path: (h, w) pairs and the output-size formula."""

from __future__ import annotations

__all__ = ["pair", "conv_output_size"]


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """An (h, w) int pair from an int or a two-element sequence, as conv2d accepts them."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
