"""Heatmaps that show where a model looked: anomaly maps and class activation maps.

- `overlay`: a map drawn over its image as a PNG (numpy + Pillow only, usable without torch)
- `cam`: class activation maps of CNN classifiers (pooling + linear heads), exportable to ONNX
- `gradcam`: Grad-CAM for the other classifiers (ViT tokens reshaped to the patch grid, CNN heads
  that are not linear)
- `write`: `vision-ft predict ... --heatmaps OUT`: one overlaid PNG per image
"""
