"""`lora_conv2d`: one entry point for the LoRA convolution, routed to Triton or torch.

Backend choice: the `backend` argument (each LoRA module's own setting), else the one default,
the environment variable VISION_FT_LORA_BACKEND, else 'auto'; each is 'auto', 'torch' or 'triton'.

* 'torch' always takes the torch path (`torch_lora_conv.py`).
* 'auto' takes the Triton kernel for CUDA tensors when `triton_supports` accepts the call,
  the torch path otherwise (CPU, grouped convs, a trainable W, Triton missing, ...).
* 'triton' demands the kernel: it is an error when the kernel cannot run at all (module
  missing or failing to import, CPU tensors without TRITON_INTERPRET=1); calls the kernel
  does not cover (`triton_supports` False) still take the torch path.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

from .conv_shape import pair
from .torch_lora_conv import torch_lora_conv2d

__all__ = ["lora_conv2d", "resolve_lora_backend", "requested_lora_backend", "ENV_VAR", "BACKENDS"]

ENV_VAR = "VISION_FT_LORA_BACKEND"
BACKENDS = ("auto", "torch", "triton")

_triton_module: ModuleType | None = None
_triton_import_error: str | None = None


def _checked(value: str, source: str) -> str:
    name = value.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"LoRA backend {value!r} (from {source}) is not one of {', '.join(BACKENDS)}")
    return name


def requested_lora_backend(backend: str | None = None) -> str:
    """The backend asked for: `backend`, else $VISION_FT_LORA_BACKEND, else 'auto'."""
    if backend is not None:
        return _checked(backend, "the backend argument")
    return _checked(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def _load_triton() -> ModuleType | None:
    """The Triton kernel module, imported once; None (with the reason kept) if it cannot be."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            _triton_module = importlib.import_module(f"{__package__}.triton_lora_conv")
        except Exception as exc:  # no triton, no compiler, an old triton: all mean "use torch"
            _triton_import_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _triton_module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _grad_into(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


def resolve_lora_backend(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    groups: int = 1,
    backend: str | None = None,
    bias: Tensor | None = None,
) -> str:
    """'triton' or 'torch': the path `lora_conv2d` takes for these tensors.

    Raises:
        ValueError: an unknown backend name, or 'triton' requested where the kernel cannot
            run (not importable; CPU tensors without TRITON_INTERPRET=1).
    """
    requested = requested_lora_backend(backend)
    if requested == "torch":
        return "torch"
    if requested == "auto" and not x.is_cuda:
        return "torch"
    module = _load_triton()
    if module is None:
        if requested == "triton":
            raise ValueError(
                f"LoRA backend 'triton' was requested but the Triton kernel cannot be imported "
                f"({_triton_import_error}); install triton on a CUDA machine or use backend 'auto' or 'torch'")
        return "torch"
    if requested == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError(
            f"LoRA backend 'triton' needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run the "
            "kernel in Triton's CPU interpreter, or use backend 'auto' or 'torch'")
    # The kernel never produces dbias; it cannot see a trainable bias through triton_supports.
    if _grad_into(bias) or not module.triton_supports(x, weight, lora_a, groups):
        return "torch"
    return "triton"


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def lora_conv2d(
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
    backend: str | None = None,
) -> Tensor:
    """y = conv2d(x, W, bias, stride, padding, dilation, groups) + scaling * conv2d(x, B @ A, ...).

    Args:
        x: (N, Cin, H, W) input, already padded for 'same', asymmetric or non-zero padding modes.
        weight: (Cout, Cin / groups, kh, kw) base weight; usually frozen.
        bias: (Cout,) or None.
        lora_a: (r, Cin / groups, kh, kw) down-projection A.
        lora_b: (Cout, r) up-projection B.
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA).
        stride, padding, dilation: (h, w) int pairs; padding symmetric.
        groups: conv groups; for groups == 1 the delta is the usual down/up projection.
        backend: 'auto', 'torch', 'triton' or None (the default: $VISION_FT_LORA_BACKEND, else 'auto').

    Under autocast the inputs are cast to the autocast dtype first, as F.conv2d would be.
    """
    cout, rank = weight.shape[0], lora_a.shape[0]
    expected_a = (rank, weight.shape[1], weight.shape[2], weight.shape[3])
    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != (cout, rank):
        raise ValueError(
            f"lora_a must be (r, Cin/groups, kh, kw) = {expected_a} and lora_b (Cout, r) = {(cout, rank)} for "
            f"weight {tuple(weight.shape)}; got lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x must be (N, {weight.shape[1] * groups}, H, W) for weight {tuple(weight.shape)} "
                         f"with groups={groups}; got {tuple(x.shape)}")
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)

    cast_to = _autocast_dtype(x)
    if cast_to is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _run(x.to(cast_to), weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups,
                        backend, cast_to)
    return _run(x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups, backend, None)


def _run(x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups, backend, cast_to):
    kernel_weight, kernel_bias = weight, bias
    if cast_to is not None and (x.is_cuda or _interpreting()) and requested_lora_backend(backend) != "torch":
        # The kernel wants W in x's dtype; the torch path casts (and caches) [W; A] itself.
        kernel_weight = weight.to(cast_to)
        kernel_bias = bias.to(cast_to) if bias is not None else None
    if resolve_lora_backend(x, kernel_weight, lora_a, groups, backend, bias) == "triton":
        if cast_to is not None:
            lora_b = lora_b.to(cast_to)
        return _triton_module.triton_lora_conv2d(
            x, kernel_weight, kernel_bias, lora_a, lora_b, scaling, stride, padding, dilation)
    return torch_lora_conv2d(x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation, groups)

