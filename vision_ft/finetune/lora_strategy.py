"""LoRA fine-tuning: low-rank adapters on the backbone's conv/linear layers, the head in full.

`prepare` injects the adapters (`vision_ft.finetune.lora.apply_lora`, which freezes all but
the adapters, the head and, with `lora.train_norm`, the norm layers) and picks the conv kernel
backend. BatchNorm layers of the frozen backbone follow `frozen_bn` like any frozen group.
Every checkpoint also gets `adapter.safetensors`: the adapter tensors alone (a few hundred KB),
to ship or swap without the full model.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from vision_ft.errors import VisionFTError
from vision_ft.finetune.layer_groups import LayerGroup, layer_groups
from vision_ft.finetune.lora import apply_lora, lora_modules, lora_state_dict
from vision_ft.finetune.strategy import Strategy, trainable_summary

log = logging.getLogger("vision_ft")

ADAPTER_FILE = "adapter.safetensors"


def _select_backend(requested: str) -> None:
    """Set the process-wide LoRA conv backend from the config.

    'auto' defers to $VISION_FT_LORA_BACKEND (then to auto-selection), so the environment
    variable keeps working. 'triton' on a machine without CUDA (e.g. evaluating a GPU-trained
    run on a laptop) would fail at the first forward; the torch path computes the same thing.
    """
    import vision_ft_kernels

    backend = None if requested == "auto" else requested
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        log.warning("finetune.lora.backend is 'triton' but this machine has no CUDA GPU; LoRA layers use the torch path")
        backend = "torch"
    vision_ft_kernels.set_lora_backend(backend)


class LoRAStrategy(Strategy):
    """Adapters (rank `lora.r`) on the backbone, the classifier head trained in full."""

    name = "lora"

    def check(self, groups: list[LayerGroup], model: nn.Module) -> None:
        if self.config.freeze_groups:
            raise VisionFTError(
                f"finetune.freeze_groups={self.config.freeze_groups} has no effect with strategy 'lora' (the whole "
                "backbone is frozen, adapters train); set freeze_groups to 0 or narrow finetune.lora.targets")

    def prepare(self, model: nn.Module) -> None:
        """Inject the adapters and set the trainable set: adapters + head (+ norms with train_norm)."""
        self.check([], model)
        lora = self.config.lora
        _select_backend(lora.backend)
        apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora,
                   target_patterns=lora.targets, train_norm=lora.train_norm)
        # apply_lora already trains the head; our head group is the one every strategy uses.
        for param in layer_groups(model)[-1].parameters(model):
            param.requires_grad_(True)

    def describe(self, model: nn.Module) -> str:
        lora = self.config.lora
        wrapped = sum(1 for _ in lora_modules(model))
        head = layer_groups(model)[-1].name
        norms = " + norm layers" if lora.train_norm else ""
        line = (f"lora: adapters r={lora.r} alpha={lora.alpha:g}{' (rsLoRA)' if lora.rslora else ''} on {wrapped} "
                f"layers + the head ({head}){norms}; {trainable_summary(model)}")
        return line + self._policy_note(model)

    def extra_checkpoint_files(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        return {ADAPTER_FILE: lora_state_dict(model)}
