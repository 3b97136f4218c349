"""Decode any supported image into an 8-bit HWC array: the one decoder shared by training,
evaluation and the torch-free ONNX runtime.

This module imports only numpy and Pillow, so the runtime can use it without torch.

Decode policy (the contract between training and deployment; change it only with a new
model-metadata version):

1. Open with Pillow and decode fully. Truncated or corrupt files raise ``VisionFTError``
   (``LOAD_TRUNCATED_IMAGES`` is never switched on). Multi-frame files (TIFF stacks) use frame 0.
2. Apply the EXIF orientation tag (``ImageOps.exif_transpose``). A broken EXIF block is ignored
   and the image is used as stored.
3. Bring the pixels to 8 bits per channel:

   * 16-bit grayscale (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; 16-bit PNG and TIFF),
     32-bit integer ``I`` and 32-bit float ``F``: mapped by the run's intensity policy
     (``data.intensity``, `vision_ft.data.intensity`). Its default, ``auto``, clips integers to
     0..65535 and divides by 257 rounding to nearest (65535 -> 255, 257 * k -> k; no per-image
     stretch, so intensities stay comparable between images) and min-max scales floats per
     image (NaN/inf treated as 0; a constant image becomes 0).
   * DICOM (``.dcm``, or the ``DICM`` preamble): modality rescale, VOI window/LUT, MONOCHROME1
     inversion, see `vision_ft.data.dicom`.
   * ``1`` (bilevel) -> ``L``; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> ``RGB``.
   * Palette ``P``: through ``RGBA`` when the palette has transparency, else ``RGB``.
   * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``): composited onto a
     white background (what a viewer shows for a transparent scan or a cut-out part), then the
     alpha channel is dropped.

4. Channels: ``channels=3`` gives RGB (grayscale replicated into three channels);
   ``channels=1`` gives ``L`` (Pillow's ITU-R 601-2 luma for colour input). The array is always
   H x W x C, also for C == 1.
0. Pixel limit: a file whose width x height passes ``max_pixels`` (default ``MAX_PIXELS``, the
   ``data.max_pixels`` setting) is refused before decoding, except a JPEG, which is decoded at
   1/2, 1/4 or 1/8 scale (Pillow's ``draft``, done inside the JPEG decoder at a fraction of the
   memory) when that brings it under the limit. Images under the limit decode as below, unchanged.
5. ``size`` (``int`` for a square, or ``(height, width)``) resizes the 8-bit image with Pillow's
   bilinear filter (which antialiases when shrinking), after steps 1-4. Training, evaluation and
   the runtime all resize here, so the model always sees pixels made the same way.

numpy input: ``H x W`` or ``H x W x C`` (C = 1, 2, 3, 4 as L, LA, RGB, RGBA), dtype uint8, or
uint16/int32/float (scaled by the intensity policy as in step 3). Pillow images go through
steps 2-5.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_ft.data.dicom import DicomFailure, is_dicom_file, read_dicom
from vision_ft.data.intensity import to_8bit
from vision_ft.data.pixel_policy import PixelPolicy
from vision_ft.errors import VisionFTError

ImageSource = Union[Path, str, Image.Image, np.ndarray]

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_TO_RGB_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_WHITE = 255
# 40 megapixels: above any camera or scanner image a classifier is trained on (a full-frame
# 45 MP photo excepted, which as a JPEG is drafted to half size), and a quarter of Pillow's own
# warning level. A 13000 x 13000 RGBA PNG (169 MP, 685 KB on disk) needed 3.2 GB to decode.
MAX_PIXELS = 40_000_000


class _DecodeFailure(Exception):
    """A file that cannot be turned into pixels; the message is a short reason."""


def _short_reason(exc: BaseException, fmt: str | None) -> str:
    kind = fmt or "image"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels (possible decompression bomb)"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated {kind}"
    return f"corrupt {kind}: {text[:80]}"


def _fit_pixel_limit(image: Image.Image, max_pixels: int) -> None:
    """Draft a large JPEG down under `max_pixels`, or raise _DecodeFailure; only reads the header."""
    width, height = image.size
    if width * height <= max_pixels:
        return
    if image.format == "JPEG":
        scale = math.ceil(math.sqrt(width * height / max_pixels))
        image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        if image.size[0] * image.size[1] <= max_pixels:
            return
    raise _DecodeFailure(
        f"{width} x {height} pixels, more than the limit of {max_pixels} (data.max_pixels); shrink the image "
        "or raise the limit"
    )


def _open_decoded(path: Path, pixels: PixelPolicy | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode (frame 0) and orient a file, or raise _DecodeFailure with a short reason."""
    if is_dicom_file(path):
        policy = pixels or PixelPolicy()
        try:
            return Image.fromarray(read_dicom(path, policy.intensity, policy.dicom))
        except DicomFailure as failure:
            raise _DecodeFailure(str(failure)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise _DecodeFailure(_short_reason(exc, "DICOM")) from None
    fmt = None
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP on; our own, lower limit (checked next) replaces the warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            fmt = image.format
            _fit_pixel_limit(image, max_pixels)
            image.load()  # the full decode: a lazy open alone would miss a truncated file
            # Orient while the file is open: TIFF keeps its orientation tag in the file's header.
            # exif_transpose returns a new in-memory image either way, so closing the file is safe.
            return _apply_exif_orientation(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise _DecodeFailure(_short_reason(exc, fmt)) from None


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a readable image unreadable
        return image.copy()
    return oriented if oriented is not None else image.copy()


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image: Image.Image, pixels: PixelPolicy | None = None) -> Image.Image:
    """An L or RGB image with the same content (steps 3 of the policy)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        intensity = (pixels or PixelPolicy()).intensity
        return Image.fromarray(to_8bit(np.asarray(image), intensity))
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        return _composite_on_white(image) if has_alpha else image.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        composited = _composite_on_white(image)
        return composited.convert("L") if mode in ("LA", "La") else composited
    if mode in _TO_RGB_MODES:
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _DecodeFailure(f"unsupported pixel mode {mode} ({exc})") from None


def _array_to_image(array: np.ndarray, pixels: PixelPolicy | None = None) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise _DecodeFailure(f"array of shape {array.shape} is not H x W or H x W x C with C in 1..4")
    if array.dtype.kind in "uif" and array.dtype != np.uint8:
        array = to_8bit(array, (pixels or PixelPolicy()).intensity)
    elif array.dtype != np.uint8:
        raise _DecodeFailure(f"array dtype {array.dtype} is not a numeric image type; convert it first")
    # Pillow infers the mode from the shape: L, LA, RGB or RGBA.
    return Image.fromarray(np.ascontiguousarray(array))


def _target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise VisionFTError(f"image size {size} must be positive")
    return height, width


def _describe(source: ImageSource) -> str:
    if isinstance(source, np.ndarray):
        return "image array"
    if isinstance(source, Image.Image):
        return f"image {getattr(source, 'filename', '') or 'object'}"
    return str(source)


def load_image(
    source: ImageSource,
    channels: int = 3,
    size: int | tuple[int, int] | None = None,
    *,
    pixels: PixelPolicy | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode `source` into an H x W x `channels` uint8 array following the module's policy.

    `pixels` is the run's intensity / DICOM policy (default: ``auto`` intensity, file window).

    Raises VisionFTError with a one-line message naming the file when it cannot be decoded.
    """
    if channels not in (1, 3):
        raise VisionFTError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    try:
        if isinstance(source, np.ndarray):
            image = _array_to_image(source, pixels)
        elif isinstance(source, Image.Image):
            try:
                source.load()  # a lazily opened image may still fail to decode here
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise _DecodeFailure(_short_reason(exc, source.format)) from None
            image = _apply_exif_orientation(source)
        else:
            image = _open_decoded(Path(source), pixels, max_pixels)
        image = _to_8bit(image, pixels)
        image = image.convert("L" if channels == 1 else "RGB")
    except _DecodeFailure as failure:
        raise VisionFTError(
            f"{_describe(source)}: cannot decode image ({failure}); remove or replace the file"
        ) from None
    if size is not None:
        height, width = _target_size(size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_problem(path: Path | str, pixels: PixelPolicy | None = None, max_pixels: int = MAX_PIXELS) -> str | None:
    """A short reason why `path` cannot be decoded, or None when it decodes cleanly."""
    try:
        _to_8bit(_open_decoded(Path(path), pixels, max_pixels), pixels)
    except _DecodeFailure as failure:
        return str(failure)
    return None


def find_bad_images(paths: list[Path], workers: int = 2, pixels: PixelPolicy | None = None,
                    max_pixels: int = MAX_PIXELS) -> list[tuple[Path, str]]:
    """(path, short reason) for every file that fails a full decode, in the order given.

    Threads suffice: Pillow releases the GIL while decoding.
    """
    if not paths:
        return []
    if workers <= 1:
        problems = [decode_problem(p, pixels, max_pixels) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(lambda p: decode_problem(p, pixels, max_pixels), paths, chunksize=32))
    return [(path, reason) for path, reason in zip(paths, problems) if reason is not None]
