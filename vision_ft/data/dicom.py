"""DICOM files as 8-bit pixels: modality rescale, VOI window or LUT, MONOCHROME1 inverted.

A file is DICOM when its name ends in ``.dcm``/``.dicom`` or when its bytes 128..131 are the
``DICM`` preamble marker (many archives store DICOM files without an extension). Reading needs
pydicom, the optional ``medical`` extra; compressed transfer syntaxes decode through whatever
decoder packages pydicom finds (Pillow, pylibjpeg, GDCM).

Steps, in the order of the DICOM standard's grayscale pipeline (PS3.4 N.2.1):

1. the stored values (one frame: multi-frame files are refused unless ``data.dicom_frame``
   picks one);
2. the modality transform (RescaleSlope/RescaleIntercept or a Modality LUT), e.g. to Hounsfield
   units;
3. the VOI transform, chosen by ``data.dicom_window``: ``file`` uses the file's VOI LUT or its
   first WindowCenter/WindowWidth, and when the file has neither falls back to
   ``data.intensity``; ``auto`` ignores the file's window and applies ``data.intensity``;
   ``[center, width]`` is one fixed window for every file;
4. MONOCHROME1 (where 0 is white) is inverted, so bright always means dense;
5. colour images (RGB, YBR, palette) come out as 8-bit RGB and skip steps 2-4.

Imports numpy at module level and pydicom only when a DICOM file is read, so the torch-free
runtime keeps working without pydicom until it meets a DICOM file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.data.intensity import IntensityPolicy, parse_intensity, range_to_8bit, to_8bit, window_to_8bit
from vision_ft.errors import VisionFTError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"


class DicomFailure(Exception):
    """A DICOM file that cannot become pixels; the message is a short reason."""


@dataclass(frozen=True)
class DicomOptions:
    """``data.dicom_window`` and ``data.dicom_frame``, parsed."""

    window: str | tuple[float, float] = "file"  # "file", "auto" or (center, width)
    frame: int | None = None

    @property
    def window_spec(self) -> str | list[float]:
        return list(self.window) if isinstance(self.window, tuple) else self.window


def parse_dicom_window(value: Any) -> str | tuple[float, float]:
    """"file", "auto" or (center, width) from a config value; VisionFTError names bad values."""
    if value in ("file", "auto"):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            center, width = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            center, width = float("nan"), float("nan")
        if width >= 1.0:
            return center, width
    raise VisionFTError(f"dicom window {value!r} is not understood; use file, auto or [center, width] with width >= 1")


def is_dicom_file(path: Path | str) -> bool:
    """True for a .dcm/.dicom name, or a file whose bytes 128..131 read ``DICM``."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(_PREAMBLE_LENGTH + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE_LENGTH:] == _MAGIC


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise VisionFTError(
            "reading DICOM files needs pydicom; install the medical extra: pip install 'vision-ft[medical]'"
        ) from None
    return pydicom


def _read_dataset(path: Path) -> Any:
    pydicom = _pydicom()
    try:
        # force: a file named .dcm without the preamble (older archives) is still read.
        return pydicom.dcmread(str(path), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise DicomFailure(f"corrupt DICOM: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:100]


def _frame(dataset: Any, options: DicomOptions) -> np.ndarray:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise DicomFailure("DICOM file holds no image (no Pixel Data element)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1 and options.frame is None:
        raise DicomFailure(
            f"multi-frame DICOM ({frames} frames); vision-ft reads one 2-D image per file: "
            "pick a frame with data.dicom_frame=N or export the frames as separate files"
        )
    if options.frame is not None and not 0 <= options.frame < frames:
        raise DicomFailure(f"data.dicom_frame={options.frame} is outside the file's {frames} frames (0..{frames - 1})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about tolerated deviations from the standard
            pixels = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoders, truncated data, bad descriptors
        text = _reason(exc)
        if "decod" in text.lower() or "decompress" in text.lower():
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", str(syntax))
            raise DicomFailure(
                f"no installed decoder could decode its transfer syntax {name}; install pydicom's decoder "
                "packages (pip install 'vision-ft[medical]') or convert the file"
            ) from None
        raise DicomFailure(f"corrupt DICOM: {text}") from None
    if frames > 1:
        pixels = pixels[options.frame or 0]
    return np.asarray(pixels)


def _is_colour(dataset: Any, pixels: np.ndarray) -> bool:
    return pixels.ndim == 3 or str(dataset.get("PhotometricInterpretation", "")).startswith("PALETTE")


def _colour_to_8bit(dataset: Any, pixels: np.ndarray, policy: IntensityPolicy) -> np.ndarray:
    if str(dataset.get("PhotometricInterpretation", "")).startswith("PALETTE"):
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, dataset)
    # pydicom returns YBR data converted to RGB; deeper colour goes through the intensity policy.
    return to_8bit(pixels, policy)


def _file_window(dataset: Any) -> tuple[float, float] | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        return _first_value(center), max(_first_value(width), 1.0)
    except (TypeError, ValueError, IndexError):
        return None


def _first_value(value: Any) -> float:
    """The first of a multi-valued element (files may list several windows), as a float."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _grey_to_8bit(dataset: Any, pixels: np.ndarray, policy: IntensityPolicy, options: DicomOptions) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(pixels, dataset)
    if isinstance(options.window, tuple):
        grey = window_to_8bit(values, *options.window)
    elif options.window == "file" and "VOILUTSequence" in dataset:
        lut = dataset.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) or 16
        grey = range_to_8bit(apply_voi(values, dataset), 0.0, float(2**bits - 1))
    elif options.window == "file" and _file_window(dataset) is not None:
        grey = window_to_8bit(values, *_file_window(dataset))
    else:
        # Modality values (Hounsfield units, doses) have no fixed range: auto min-max scales them.
        grey = to_8bit(values.astype(np.float64), "minmax" if policy.kind == "auto" else policy)
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return grey


def read_dicom(path: Path | str, policy: IntensityPolicy | str = "auto", options: DicomOptions | None = None) -> np.ndarray:
    """The 8-bit pixels of one DICOM image: H x W (grey) or H x W x 3 (colour).

    Raises DicomFailure with a short reason for damaged, multi-frame or undecodable files, and
    VisionFTError when pydicom is not installed.
    """
    policy = parse_intensity(policy)
    options = options or DicomOptions()
    dataset = _read_dataset(Path(path))
    pixels = _frame(dataset, options)
    if _is_colour(dataset, pixels):
        return _colour_to_8bit(dataset, pixels, policy)
    return _grey_to_8bit(dataset, pixels, policy, options)
