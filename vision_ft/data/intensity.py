"""How images with more than 8 bits per channel become the 8-bit pixels every model sees.

A 16-bit PNG/TIFF, a float TIFF or a DICOM file holds values that have no single right mapping
onto 0..255: a CT scan in Hounsfield units needs a window, a microscope image a percentile
stretch. The mapping is chosen on purpose in the config and recorded with the run and in the
exported model, so training, evaluation, prediction and the runtime apply the same one.

``data.intensity`` (the ``IntensityPolicy``):

* ``auto`` (the default, and decode policy 1 of `vision_ft.data.decode`): integer images are
  scaled from their full range (16-bit: v / 257, so intensities stay comparable between images);
  float images, and DICOM images without a window, are min-max scaled per image.
* ``minmax``: per image, the smallest value becomes 0 and the largest 255.
* ``percentile[lo,hi]`` (``percentile`` alone is ``percentile[1,99]``): per image, values at or
  below the lo-th percentile become 0, at or above the hi-th 255, linear between.
* ``window[center,width]``: one fixed window for every image, the DICOM linear VOI function
  (PS3.3 C.11.2.1.2.1): ``center - width/2`` maps to 0, ``center + width/2`` to 255.

8-bit images are never rescaled. NaN and infinite values count as 0. Imports only numpy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision_ft.errors import VisionFTError

INTENSITY_KINDS = ("auto", "minmax", "percentile", "window")
DEFAULT_PERCENTILES = (1.0, 99.0)
_SPEC = re.compile(r"^\s*(auto|minmax|percentile|window)\s*(?:\[\s*([^\],]+)\s*,\s*([^\]]+)\s*\])?\s*$")
_EXPLAIN = "use auto, minmax, percentile[1,99] or window[center,width], e.g. window[40,400]"


@dataclass(frozen=True)
class IntensityPolicy:
    """A parsed ``data.intensity`` setting; `spec` is its canonical text."""

    kind: str = "auto"
    low: float = 0.0  # percentile: lower percentile; window: center
    high: float = 0.0  # percentile: upper percentile; window: width

    @property
    def spec(self) -> str:
        if self.kind == "percentile":
            return f"percentile[{self.low:g},{self.high:g}]"
        if self.kind == "window":
            return f"window[{self.low:g},{self.high:g}]"
        return self.kind


def parse_intensity(value: Any) -> IntensityPolicy:
    """An IntensityPolicy from text such as ``percentile[1,99]``; VisionFTError names bad values."""
    if isinstance(value, IntensityPolicy):
        return value
    match = _SPEC.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise VisionFTError(f"intensity policy {value!r} is not understood; {_EXPLAIN}")
    kind, first, second = match.groups()
    if kind in ("auto", "minmax"):
        if first is not None:
            raise VisionFTError(f"intensity policy {value!r}: {kind} takes no numbers; {_EXPLAIN}")
        return IntensityPolicy(kind)
    if first is None:
        if kind == "window":
            raise VisionFTError(f"intensity policy {value!r} needs its center and width, e.g. window[40,400]")
        return IntensityPolicy(kind, *DEFAULT_PERCENTILES)
    try:
        low, high = float(first), float(second)
    except ValueError:
        raise VisionFTError(f"intensity policy {value!r} holds a value that is not a number; {_EXPLAIN}") from None
    if kind == "percentile" and not 0.0 <= low < high <= 100.0:
        raise VisionFTError(f"intensity policy {value!r}: percentiles need 0 <= lo < hi <= 100, e.g. percentile[1,99]")
    if kind == "window" and not high >= 1.0:
        raise VisionFTError(f"intensity policy {value!r}: the window width must be at least 1, e.g. window[40,400]")
    return IntensityPolicy(kind, low, high)


def window_to_8bit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) onto 0..255."""
    values = _finite(values)
    scaled = ((values - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5) * 255.0
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def range_to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto 0..255, clipped; a flat range gives 0."""
    values = _finite(values)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(np.clip((values - low) * (255.0 / (high - low)), 0.0, 255.0)).astype(np.uint8)


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _full_range(values: np.ndarray) -> tuple[float, float] | None:
    """The fixed range of an integer dtype wider than 8 bits (auto's scale), None for floats."""
    if values.dtype.kind == "u":
        return 0.0, float(np.iinfo(values.dtype).max)
    if values.dtype.kind == "i":
        # Signed images (e.g. Pillow's 32-bit "I" mode of a 16-bit PNG) keep the 16-bit scale.
        return 0.0, 65535.0
    return None


def to_8bit(values: np.ndarray, policy: IntensityPolicy | str = "auto") -> np.ndarray:
    """`values` (any numeric dtype, any shape) as uint8 under `policy`; uint8 input is returned as is."""
    policy = parse_intensity(policy)
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if policy.kind == "window":
        return window_to_8bit(values, policy.low, policy.high)
    if policy.kind == "auto":
        fixed = _full_range(values)
        if fixed is not None:
            if fixed == (0.0, 65535.0):
                # (v + 128) // 257 rounds v / 257 to nearest: 65535 -> 255, 257 * k -> k exactly.
                return ((np.clip(values.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8)
            return range_to_8bit(values, *fixed)
    finite = _finite(values)
    if policy.kind == "percentile":
        low, high = np.percentile(finite, [policy.low, policy.high])
        return range_to_8bit(finite, float(low), float(high))
    return range_to_8bit(finite, float(finite.min()), float(finite.max()))
