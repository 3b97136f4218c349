"""Models whose input size is fixed when they are built (ViT, DeiT, Swin, ...).

timm builds them for `img_size`; pretrained weights made for another size need their position
tables resampled. timm's own loaders do that for hub weights; for a local weights file the
model family's `checkpoint_filter_fn` (the same function timm's loader calls) is applied here.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def is_fixed_size(name: str) -> bool:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name.split(".")[0])
    return bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else False


def fixed_size_kwargs(name: str, image_size: int | None) -> dict[str, Any]:
    """`{"img_size": image_size}` for models built for one input size, else nothing."""
    if image_size is None or not is_fixed_size(name):
        return {}
    return {"img_size": int(image_size)}


def _grid_tensors_differ(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return any(k in own and own[k].shape != v.shape and ("pos_embed" in k or "relative_position" in k or "attn_mask" in k)
               for k, v in state.items())


def resample_for_input_size(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with position embeddings (and relative position tables) resampled to the model's grid.

    Only when such a tensor differs in shape; other mismatches are left for the weights loader
    to report.
    """
    if not _grid_tensors_differ(model, state):
        return state
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    return filter_fn(dict(state), model)


def check_input_size(name: str, num_classes: int, channels: int, image_size: int) -> None:
    """Raise a one-line VisionFTError, before any file is written, when `name` cannot take
    `image_size` px (a forward pass on the meta device: no memory, no arithmetic)."""
    from vision_ft.errors import VisionFTError
    from vision_ft.models.create import create_model

    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_chans=channels, weights="none", image_size=image_size)
    except VisionFTError:
        raise
    except Exception:  # cannot live on the meta device: the first training step will tell
        return
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, image_size, image_size, device="meta"))
    except (AssertionError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise VisionFTError(f"model '{name}' cannot take {image_size} px images ({reason}); set data.image_size "
                            "to a size it accepts, e.g. a multiple of 32, or leave it at auto") from None
    except Exception:  # an op without a meta kernel proves nothing either way
        return
