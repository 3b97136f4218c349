"""LoRA convolution kernels, packaged as `vision_ft_kernels`.

`lora_conv2d` is the entry point: it routes each call to the Triton kernel
(`triton_lora_conv.py`, CUDA) or to the torch path (`torch_lora_conv.py`, everywhere), and
`reference.py` holds the plain composition both are tested against.
"""

from .dispatch import lora_conv2d, requested_lora_backend, resolve_lora_backend

__all__ = ["lora_conv2d", "resolve_lora_backend", "requested_lora_backend"]
