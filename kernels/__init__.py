"""LoRA convolution kernels, packaged as `vision_ft_kernels`.

`lora_conv2d` (dispatch.py) is the entry point: it routes each call to the Triton kernel
(CUDA) or to the torch path (everywhere).

    dispatch.py              backend choice, argument checks, autocast
    torch_lora_conv.py       the torch path (any device, any groups)
    triton_lora_conv.py      Triton entry point and autograd wiring (groups == 1)
    triton_lora_conv_fwd.py  fused forward kernel
    triton_lora_conv_bwd.py  dx and dA kernels
    triton_common.py         Triton helpers both kernel modules share
    triton_tiles.py          autotune tiles and their ptxas spill claims
    conv_shape.py            (h, w) pairs and the output-size formula

The plain reference composition the paths are tested against lives with the tests.
"""

from .dispatch import lora_conv2d, requested_lora_backend, resolve_lora_backend

__all__ = ["lora_conv2d", "resolve_lora_backend", "requested_lora_backend"]
