"""The recorded pixel policy of a run: intensity mapping plus DICOM window and frame.

One object carries ``data.intensity``, ``data.dicom_window`` and ``data.dicom_frame`` from the
config (training, eval, predict) or from an exported model's metadata (the runtime) to
`vision_ft.data.decode.load_image`, so every path decodes pixels the same way. Imports only
numpy and vision-ft's torch-free modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vision_ft.data.dicom import DicomOptions, parse_dicom_window
from vision_ft.data.intensity import IntensityPolicy, parse_intensity
from vision_ft.errors import VisionFTError


@dataclass(frozen=True)
class PixelPolicy:
    intensity: IntensityPolicy = field(default_factory=IntensityPolicy)
    dicom: DicomOptions = field(default_factory=DicomOptions)

    @classmethod
    def from_settings(cls, intensity: Any = "auto", dicom_window: Any = "file", dicom_frame: Any = None) -> "PixelPolicy":
        """Parse the three settings (as written in a config or in model metadata)."""
        if dicom_frame is not None and (not isinstance(dicom_frame, int) or dicom_frame < 0):
            raise VisionFTError(f"dicom frame {dicom_frame!r} must be a frame index 0, 1, ... or null")
        return cls(parse_intensity(intensity), DicomOptions(parse_dicom_window(dicom_window), dicom_frame))

    def settings(self) -> dict[str, Any]:
        """{intensity, dicom_window, dicom_frame} as JSON-ready values (the model metadata's fields)."""
        return {"intensity": self.intensity.spec, "dicom_window": self.dicom.window_spec, "dicom_frame": self.dicom.frame}


def policy_from_config(data: Any) -> PixelPolicy:
    """The PixelPolicy of a config's `data` section."""
    return PixelPolicy.from_settings(data.intensity, data.dicom_window, data.dicom_frame)


def policy_from_metadata(metadata: Any) -> PixelPolicy:
    """The PixelPolicy an exported model's metadata (`vision_ft.onnx_metadata.ModelMetadata`) records."""
    return PixelPolicy.from_settings(metadata.intensity, metadata.dicom_window, metadata.dicom_frame)
