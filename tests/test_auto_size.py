"""data.image_size: auto, and backbones built for the chosen size."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.real_data import SHARED_DATA, needs_neu, NEU
from vision_ft.auto_size import MIN_SIZE, choose_image_size, native_sizes
from vision_ft.errors import VisionFTError
from vision_ft.models.create import create_model
from vision_ft.models.input_size import check_input_size

PNEUMONIA = SHARED_DATA / "pneumoniamnist.npz"


def _pneumonia_pngs(folder: Path, count: int = 20) -> list[Path]:
    if not PNEUMONIA.is_file():
        pytest.skip("needs pneumoniamnist.npz in ../shared/data")
    images = np.load(PNEUMONIA)["train_images"][:count]
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@needs_neu
def test_neu_images_keep_their_native_size_rounded_to_the_stride():
    paths = sorted(NEU.rglob("*.jpg"))
    assert set(native_sizes(paths, sample=40)) == {(200, 200)}
    choice = choose_image_size(paths, "resnet18")
    assert choice.size == 192  # 200 px rounded to resnet18's stride 32
    assert "200 px" in choice.reason and "stride 32" in choice.reason


def test_28px_xrays_are_not_blown_up_to_224(tmp_path):
    choice = choose_image_size(_pneumonia_pngs(tmp_path), "tf_efficientnet_lite0")
    assert choice.size == MIN_SIZE
    assert "28 px" in choice.reason and "minimum" in choice.reason


def test_large_images_are_capped_at_the_pretraining_size(tmp_path):
    for i in range(3):
        Image.new("L", (600, 450)).save(tmp_path / f"{i}.png")
    assert choose_image_size(sorted(tmp_path.glob("*.png")), "tf_efficientnet_lite0").size == 224
    # a ViT's stride is its patch: 16
    assert choose_image_size(sorted(tmp_path.glob("*.png")), "vit_tiny_patch16_224").size == 224


def test_unreadable_headers_fall_back_to_the_pretraining_size(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    choice = choose_image_size([broken], "resnet18")
    assert choice.size == 224 and "no image header readable" in choice.reason


def test_vit_from_a_weights_file_is_built_for_64_px_with_resampled_position_embeddings(tmp_path):
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(weights))
    model = create_model("vit_tiny_patch16_224", num_classes=3, weights=str(weights), image_size=64)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    expected = timm.layers.resample_abs_pos_embed(pretrained.pos_embed, [4, 4], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    assert torch.equal(model.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_a_size_the_model_cannot_take_is_one_line_before_any_file():
    check_input_size("vit_tiny_patch16_224", 3, 3, 64)  # fine: built for 64 px
    with pytest.raises(VisionFTError) as info:
        check_input_size("vit_tiny_patch16_224", 3, 3, 8)  # smaller than one 16-px patch
    assert "cannot take 8 px" in str(info.value) and "data.image_size" in str(info.value)
    assert "\n" not in str(info.value)
