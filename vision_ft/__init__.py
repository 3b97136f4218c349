"""vision-ft: fine-tune pretrained vision models on folders of labelled images.

This module must stay import-light (no torch): the ONNX runtime imports the package.
"""

__version__ = "0.1.0"
