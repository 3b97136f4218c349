"""LoRA fine-tuning: low-rank adapters on the backbone's conv/linear layers, the head in full.

`adapt` injects the adapters, each conv adapter with the kernel backend of `lora.backend` (a
per-module setting, nothing process-wide); `set_trainable` freezes all but the adapters, the
head and, with `lora.train_norm`, the norm layers. BatchNorm layers of the frozen backbone
follow `frozen_bn` like any frozen group.
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
from vision_ft.finetune.lora import inject_lora, lora_modules, lora_state_dict, train_adapters_only
from vision_ft.finetune.strategy import Strategy, trainable_summary

log = logging.getLogger("vision_ft")

ADAPTER_FILE = "adapter.safetensors"


def module_backend(requested: str) -> str | None:
    """The kernel setting each conv adapter gets for `finetune.lora.backend`.

    'auto' gives None: the adapters follow the one default ($VISION_FT_LORA_BACKEND, else
    auto-selection). 'triton' on a machine without CUDA (e.g. evaluating a GPU-trained run on a
    laptop) would fail at the first forward; the torch path computes the same thing.
    """
    if requested == "auto":
        return None
    if requested == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        log.warning("finetune.lora.backend is 'triton' but this machine has no CUDA GPU; LoRA layers use the torch path")
        return "torch"
    return requested


class LoRAStrategy(Strategy):
    """Adapters (rank `lora.r`) on the backbone, the classifier head trained in full."""

    name = "lora"

    def check(self, groups: list[LayerGroup], model: nn.Module) -> None:
        if self.config.freeze_groups:
            raise VisionFTError(
                f"finetune.freeze_groups={self.config.freeze_groups} has no effect with strategy 'lora' (the whole "
                "backbone is frozen, adapters train); set freeze_groups to 0 or narrow finetune.lora.targets")

    def adapt(self, model: nn.Module) -> None:
        """Inject the adapters (each conv adapter with the configured kernel backend)."""
        self.check([], model)
        lora = self.config.lora
        inject_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora,
                    target_patterns=lora.targets, backend=module_backend(lora.backend))

    def set_trainable(self, model: nn.Module, epoch: int = 1) -> None:
        """Adapters + head (+ norms with train_norm) train, in every epoch."""
        train_adapters_only(model, self.config.lora.train_norm)

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
