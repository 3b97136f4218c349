"""Grad-CAM (Selvaraju et al. 2017) for classifiers without a pooling + linear head.

The last feature map's channels (ViT: the patch tokens entering the last block, reshaped to the
patch grid) are weighted by the mean gradient of the class logit with respect to them; the positive
part of the weighted sum is the map. Needs torch (gradients), so these maps come from run folders,
not from exported models.
"""

from __future__ import annotations

import torch
from torch import nn

from vision_ft.errors import VisionFTError


def _token_grid(model: nn.Module, tokens: int) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == tokens:
        return int(grid[0]), int(grid[1])
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise VisionFTError(f"cannot lay {tokens} tokens of {type(model).__name__} on a square grid for a heatmap")
    return side, side


def gradcam(model: nn.Module, images: torch.Tensor, class_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N x K, maps N x h x w) for `class_index` (default: each image's top class)."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    blocks = getattr(model, "blocks", None)
    is_vit = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and hasattr(model, "num_prefix_tokens")

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured["activations"] = output

    with torch.enable_grad():
        images = images.detach().requires_grad_(True)  # gradients flow even through frozen weights
        if is_vit:
            # The last block's input (after its first norm), not its output: with a class-token
            # head only the class token of the output reaches the logits, so the patch tokens'
            # gradients there are zero. One attention layer later they are not.
            target = getattr(blocks[-1], "norm1", None) or blocks[-1]
            hook = target.register_forward_hook(keep)
            try:
                logits = model(images)
            finally:
                hook.remove()
        else:
            features = model.forward_features(images)
            if features.dim() != 4:
                raise VisionFTError(f"{type(model).__name__} gives no feature map to draw a heatmap from")
            captured["activations"] = features
            logits = model.forward_head(features)
        chosen = logits.argmax(1) if class_index is None else class_index
        # Gradients for the activations only: the model's own .grad fields stay untouched.
        grads = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), captured["activations"])[0]
    activations = captured["activations"].detach()
    if is_vit:
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        activations, grads = activations[:, prefix:], grads[:, prefix:]
        weights = grads.mean(1, keepdim=True)  # N x 1 x D
        maps = (activations * weights).sum(-1).clamp(min=0)
        maps = maps.reshape(len(maps), *_token_grid(model, maps.shape[1]))
    else:
        weights = grads.mean((2, 3), keepdim=True)  # N x C x 1 x 1
        maps = (activations * weights).sum(1).clamp(min=0)
    return logits.detach(), maps
