"""Augmentation specs and the train/eval pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_ft.data.transforms import build_transforms, validate_augment_spec
from vision_ft.errors import VisionFTError

DEFAULT_LIKE = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "Affine", "rotate": [-10, 10], "translate_percent": [-0.05, 0.05], "p": 0.5},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
    {"name": "OneOf", "p": 0.3, "transforms": [{"name": "GaussianBlur"}, {"name": "GaussNoise"}]},
]


def test_valid_spec_passes_and_lists_become_tuples():
    validate_augment_spec(DEFAULT_LIKE)
    pipeline = build_transforms(DEFAULT_LIKE, (0.5,), (0.25,), train=True)
    affine = pipeline.transforms[2]
    assert type(affine).__name__ == "Affine"
    assert affine.rotate == (-10, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"name": "HorizontalFlp"}], r"\[0\]: unknown transform 'HorizontalFlp'; did you mean 'HorizontalFlip'"),
        ([{"name": "horizontalflip"}], "did you mean 'HorizontalFlip'"),
        ([{"name": "HorizontalFlip"}, {"name": "Affine", "rotat": [1, 2]}], r"\[1\]: Affine has no argument 'rotat'; did you mean 'rotate'"),
        ([{"name": "HorizontalFlip", "p": 3}], "HorizontalFlip bad argument 'p'"),
        ([{"name": "Affine", "rotate": "lots"}], "Affine bad argument 'rotate'"),
        ([{"p": 0.5}], "has no 'name'"),
        (["HorizontalFlip"], "must be a mapping"),
        ([{"name": "Normalize"}], "added automatically"),
        ([{"name": "BBoxSafeRandomCrop"}], "needs bounding boxes"),
        ([{"name": "OneOf"}], "needs a non-empty 'transforms' list"),
        ([{"name": "OneOf", "transforms": [{"name": "Blurr"}]}], r"\[0\]\.transforms\[0\]: unknown transform 'Blurr'"),
        ({"name": "HorizontalFlip"}, "must be a list"),
    ],
)
def test_spec_mistakes_name_the_transform(spec, message):
    with pytest.raises(VisionFTError, match=message):
        validate_augment_spec(spec)


def test_eval_pipeline_ignores_augment_and_normalises():
    image = np.full((8, 6, 3), 255, dtype=np.uint8)
    image[0, 0] = 0
    pipeline = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    out = pipeline(image=image)["image"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (3, 8, 6)
    assert out[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]  # not flipped
    assert torch.all(out[:, 1:, :] == 1.0)


def test_train_pipeline_applies_augment_on_one_channel():
    image = np.zeros((4, 4, 1), dtype=np.uint8)
    image[0, 0] = 255
    pipeline = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], (0.0,), (1.0,), train=True)
    out = pipeline(image=image)["image"]
    assert out.shape == (1, 4, 4)
    assert out[0, 0, 3] == 1.0 and out[0, 0, 0] == 0.0


def test_same_seed_same_augmentations():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    spec = [{"name": "Affine", "rotate": [-30, 30], "p": 1.0}]
    first = build_transforms(spec, (0.5,), (0.5,), train=True, seed=5)
    second = build_transforms(spec, (0.5,), (0.5,), train=True, seed=5)
    assert torch.equal(first(image=image)["image"], second(image=image)["image"])


@pytest.mark.parametrize(("mean", "std"), [((0.5, 0.5), (0.5, 0.5)), ((0.5,), (0.0,)), ((0.5, 0.5, 0.5), (0.5,))])
def test_bad_normalisation(mean, std):
    with pytest.raises(VisionFTError, match="data.(mean|std)"):
        build_transforms([], mean, std, train=False)
