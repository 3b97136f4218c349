"""Draw a heatmap over its image (numpy and Pillow only, so the torch-free runtime can use it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vision_ft.data.decode import ImageSource, load_image

# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours of the common "jet"
# family, interpolated linearly); low values stay mostly transparent in the overlay.
_ANCHORS = np.array([[0, 0, 128], [0, 96, 255], [0, 220, 220], [255, 230, 0], [255, 60, 0], [160, 0, 0]], dtype=np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """H x W values in 0..1 -> H x W x 3 uint8 colours."""
    position = np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    colours = _ANCHORS[low] * (1 - fraction) + _ANCHORS[low + 1] * fraction
    return colours.round().astype(np.uint8)


def min_max(heat: np.ndarray) -> np.ndarray:
    """Scale a map to 0..1 (class activation maps have no fixed range; a flat map becomes 0)."""
    heat = np.asarray(heat, dtype=np.float64)
    span = heat.max() - heat.min()
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width)."""
    height, width = size
    if heat.shape == (height, width):
        return np.asarray(heat, dtype=np.float32)
    image = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """`image` (H x W x 3 or H x W x 1 uint8) with `heat` (0..1, any size) blended on top; each
    pixel's opacity grows with its heat so that cold regions show the part itself."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    heat = np.clip(resize_map(heat, rgb.shape[:2]), 0.0, 1.0)
    alpha = (opacity * (0.3 + 0.7 * heat))[..., None]
    blended = rgb.astype(np.float64) * (1 - alpha) + colorize(heat).astype(np.float64) * alpha
    return blended.round().clip(0, 255).astype(np.uint8)


def write_overlay(source: ImageSource, heat: np.ndarray, path: Path) -> None:
    """The image at its own size with `heat` (0..1) drawn over it, as a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(load_image(source, 3), heat)).save(path, format="PNG")
