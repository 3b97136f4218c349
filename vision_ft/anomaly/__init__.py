"""Anomaly detection from good parts only: a PatchCore-style model on a frozen timm backbone.

Fitting collects locally aggregated mid-level patch features of good images, keeps a greedy
k-center coreset of them as the memory bank, and scores a new image by the distance of its
patches to their nearest bank neighbours (Roth et al., "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022). One job per module:

- `features`: the frozen backbone and its patch features
- `reservoir`: a bounded, uniform sample of the patch features streamed in
- `coreset`: greedy k-center selection of the memory bank
- `scorer`: the exportable model (bank distances, image score, anomaly map, normalisation)
- `threshold`: the decision threshold and why it was chosen
- `decision`: normalised score -> good / defective / uncertain (numpy only, shared with the runtime)
- `data`: which images are fitted, validated and tested
- `fit`: `train --task anomaly`; `model_file`: the fitted model in the run folder
- `evaluate`, `plots`, `report`: metrics, the score histogram and report.md
- `export`: ONNX with the score and the anomaly map, verified against torch
- `runtime`: the torch-free detector behind `vision_ft.runtime.load_model`
- `predict`: predictions and heatmaps of a run folder
"""
