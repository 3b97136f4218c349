"""The one check for unreadable images before a run, an evaluation or a prediction reads them."""

from __future__ import annotations

import logging
from pathlib import Path

from vision_ft.data.decode import MAX_PIXELS, find_bad_images
from vision_ft.data.pixel_policy import PixelPolicy
from vision_ft.errors import VisionFTError

log = logging.getLogger("vision_ft")


def unreadable_images(paths: list[Path], workers: int, skip_bad: bool, where: str,
                      max_pixels: int = MAX_PIXELS, pixels: PixelPolicy | None = None) -> set[Path]:
    """The paths under `where` that fail a full decode.

    Raises:
        VisionFTError: some image is unreadable and `skip_bad` is False; the message names the
        first three and the fix. With `skip_bad` they are only logged as a warning.
    """
    bad = find_bad_images(paths, workers=max(1, workers), pixels=pixels, max_pixels=max_pixels)
    if not bad:
        return set()
    listed = ", ".join(f"{p} ({why})" for p, why in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    if not skip_bad:
        raise VisionFTError(
            f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''} in {where}: {listed}{more}; "
            "remove or fix them, or pass --skip-bad-images to leave them out"
        )
    log.warning("leaving out %d unreadable images: %s%s", len(bad), listed, more)
    return {path for path, _ in bad}
