"""vision-ft: fine-tune pretrained vision models on folders of labelled images.

This module must stay import-light (no torch): the ONNX runtime imports the package.
"""

import os

# albumentations asks PyPI for a newer release on import; training servers are often offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
