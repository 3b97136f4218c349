"""`data.image_size: auto`: the input size from the images themselves.

The native sizes come from the file headers (Pillow reads the size without decoding the
pixels) of up to SAMPLE_SIZE images. The median shorter side is clamped between MIN_SIZE and
the backbone's pretraining size, then rounded to a multiple of the backbone's total stride, so
28-px images are never blown up to 224 px and 300-px images are not trained above what the
backbone was pretrained at.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# 96 px: on 28-px chest X-rays (a few hundred training images) 96 px scored 0.897 test accuracy
# and 128 px 0.789, 224 px 0.846 (issue measurements); below ~64 px a stride-32 CNN is left
# with a 2x2 feature map.
MIN_SIZE = 96
SAMPLE_SIZE = 256
DEFAULT_PRETRAIN_SIZE = 224
DEFAULT_STRIDE = 32


@dataclass(frozen=True)
class SizeChoice:
    size: int
    reason: str


def native_sizes(paths: list[Path], sample: int = SAMPLE_SIZE, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) from the headers of up to `sample` images; unreadable headers are left out."""
    chosen = list(paths)
    if len(chosen) > sample:
        chosen = random.Random(seed).sample(chosen, sample)
    sizes = []
    for path in chosen:
        try:
            with Image.open(path) as image:  # lazy: reads the header only
                sizes.append(image.size)
        except Exception:  # DICOM and other formats Pillow does not know: no vote
            continue
    return sizes


def backbone_geometry(model_name: str) -> tuple[int, int, bool]:
    """(pretraining input size, total stride, whether the input size is fixed at creation)."""
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name.split(".")[0])
    pretrain = int(cfg.input_size[-1]) if cfg is not None else DEFAULT_PRETRAIN_SIZE
    fixed = bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else False
    stride = DEFAULT_STRIDE
    try:
        with torch.device("meta"):  # no memory, no weights: only the layer layout
            model = timm.create_model(model_name, pretrained=False)
        info = getattr(model, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, list) else info.info[-1]
            stride = int(last.get("reduction", DEFAULT_STRIDE))
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch:
            stride = max(stride, int(patch[0] if isinstance(patch, (tuple, list)) else patch))
    except Exception:  # a model that cannot be built on the meta device keeps the default stride
        pass
    return pretrain, max(1, stride), fixed


def round_to_stride(size: float, stride: int) -> int:
    return max(stride, int(round(size / stride)) * stride)


def choose_image_size(paths: list[Path], model_name: str, seed: int = 0) -> SizeChoice:
    """The input size for `model_name` on these images, with the reason in words."""
    pretrain, stride, _ = backbone_geometry(model_name)
    sizes = native_sizes(paths, seed=seed)
    if not sizes:
        return SizeChoice(pretrain, f"{pretrain} px: no image header readable, the backbone's pretraining size")
    shorter = sorted(min(w, h) for w, h in sizes)
    median = shorter[len(shorter) // 2]
    clamped = min(max(median, MIN_SIZE), pretrain)
    size = round_to_stride(clamped, stride)
    if size > pretrain:  # rounding up past the pretraining size
        size = max(stride, (pretrain // stride) * stride)
    if median < MIN_SIZE:
        why = f"images are {median} px (median shorter side), raised to the minimum {MIN_SIZE} px"
    elif median > pretrain:
        why = f"images are {median} px (median shorter side), capped at {model_name}'s pretraining size {pretrain} px"
    else:
        why = f"images are {median} px (median shorter side)"
    if size != clamped:
        why += f", rounded to a multiple of the backbone's stride {stride}"
    return SizeChoice(size, f"{size} px: {why}; {len(sizes)} headers read")
