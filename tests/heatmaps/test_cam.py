"""Class activation maps: exact for pooling + linear heads (their mean is the logit), Grad-CAM for
ViTs on the patch grid, and the overlay that draws them."""

from __future__ import annotations

import numpy as np
import timm
import torch

from vision_ft.heatmaps.cam import CamClassifier, has_linear_cam
from vision_ft.heatmaps.gradcam import gradcam
from vision_ft.heatmaps.overlay import colorize, overlay


def test_cam_means_are_the_logits_for_pooling_and_linear_heads() -> None:
    torch.manual_seed(0)
    for name in ("resnet18", "tf_efficientnet_lite0"):
        model = timm.create_model(name, pretrained=False, num_classes=4).eval()
        assert has_linear_cam(model, 3, 64)
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            logits, maps = CamClassifier(model)(images)
            expected = model(images)
        assert maps.shape == (2, 4, 2, 2)
        head = model.get_classifier()
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(maps.mean((2, 3)) + head.bias, expected, atol=1e-4, rtol=1e-4)


def test_heads_that_are_not_linear_on_the_feature_map_are_refused() -> None:
    for name in ("convnext_atto", "vit_tiny_patch16_224"):
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=64) if name.startswith("vit") \
            else timm.create_model(name, pretrained=False, num_classes=3)
        assert not has_linear_cam(model, 3, 64), name


def test_vit_gradcam_lies_on_the_patch_grid_and_follows_the_evidence() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64).eval()
    logits, maps = gradcam(model, torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 2) and maps.shape == (3, 4, 4)
    assert (maps >= 0).all() and maps.sum() > 0
    assert all(p.grad is None for p in model.parameters())  # nothing trained, no gradients left


def test_cnn_gradcam_without_linear_head() -> None:
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).eval()
    logits, maps = gradcam(model, torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and maps.shape == (2, 2, 2)


def test_overlay_colours_the_hot_region_only() -> None:
    image = np.full((40, 40, 1), 128, dtype=np.uint8)
    heat = np.zeros((10, 10))
    heat[0:3, 0:3] = 1.0
    drawn = overlay(image, heat)
    assert drawn.shape == (40, 40, 3)
    assert drawn[2, 2, 0] > drawn[2, 2, 2] + 50 and drawn[2, 2, 0] > drawn[2, 2, 1] + 50  # red where hot
    assert drawn[35, 35, 2] >= drawn[35, 35, 0]  # blue-grey where cold
    ramp = colorize(np.linspace(0, 1, 5)[None])[0]
    assert ramp[0, 2] > ramp[0, 0] and ramp[-1, 0] > ramp[-1, 2]
