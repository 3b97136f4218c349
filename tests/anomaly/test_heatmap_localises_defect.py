"""A defect pasted onto a good NEU-DET steel texture lights up the anomaly map where it was pasted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.real_data import NEU, needs_neu
from vision_ft.anomaly.features import build_extractor
from vision_ft.anomaly.fit import fit_scorer
from vision_ft.config import build_config
from vision_ft.data.dataset import ImageDataset
from vision_ft.data.decode import load_image
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import build_loader
from vision_ft.data.transforms import build_transforms
from vision_ft.run_model import normalisation

SIZE = 128
PLACES = [(40, 120), (120, 40), (60, 60), (130, 130), (30, 140)]  # top-left corners on the 200 px image
SIDE = 40


@needs_neu
def test_pasted_scratch_is_where_the_map_is_hottest(lite0_weights: Path) -> None:
    textures = sorted((NEU / "rolled-in_scale").glob("*.jpg"))
    config = build_config(None, [f"data.image_size={SIZE}", "data.workers=0", "anomaly.max_patches=3000"],
                          model_name="tf_efficientnet_lite0", model_weights=str(lite0_weights))
    extractor = build_extractor(config)
    mean, std = normalisation(config, extractor.backbone)
    transform = build_transforms([], mean, std, train=False)
    good = ImageDataset([Sample(p, 0) for p in textures[:12]], transform, 3, SIZE)
    scorer, _ = fit_scorer(config, extractor, build_loader(good, 8, train=False, workers=0), torch.device("cpu"))

    scratch = np.asarray(Image.open(sorted((NEU / "scratches").glob("*.jpg"))[5]).convert("L"))
    scale = SIZE / 200
    for texture, (y, x) in zip(textures[12:], PLACES):
        pixels = np.asarray(Image.open(texture).convert("L")).copy()
        pixels[y:y + SIDE, x:x + SIDE] = scratch[80:80 + SIDE, 80:80 + SIDE]
        batch = transform(image=load_image(pixels, 3, SIZE))["image"][None]
        with torch.no_grad():
            heat = scorer.raw(batch)[1][0].numpy()
        inside = np.zeros_like(heat, dtype=bool)
        inside[int(y * scale):int((y + SIDE) * scale), int(x * scale):int((x + SIDE) * scale)] = True
        hottest = np.unravel_index(heat.argmax(), heat.shape)
        assert inside[hottest], f"{texture.name}: hottest pixel {hottest} is outside the pasted square at {(y, x)}"
        assert heat[inside].mean() > 1.4 * heat[~inside].mean()
