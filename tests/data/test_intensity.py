"""The recorded intensity policy for 16-bit PNG/TIFF and float TIFF images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vision_ft.config import build_config
from vision_ft.data.decode import load_image
from vision_ft.data.intensity import parse_intensity, to_8bit
from vision_ft.data.pixel_policy import PixelPolicy
from vision_ft.errors import VisionFTError


def sixteen_bit_png(path, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(9000, 21000, (24, 32), dtype=np.uint16)  # a narrow band of a 16-bit range
    values[0, 0], values[0, 1] = 100, 60000  # outliers the percentile policy clips
    Image.fromarray(values).save(path)
    return values


def decode(path, spec):
    return load_image(path, channels=1, pixels=PixelPolicy.from_settings(intensity=spec))[:, :, 0]


def test_each_policy_on_a_sixteen_bit_png(tmp_path):
    values = sixteen_bit_png(tmp_path / "a.png").astype(np.float64)
    auto = decode(tmp_path / "a.png", "auto")
    assert (auto == (values.astype(np.int64) + 128) // 257).all()  # decode policy 1, unchanged
    minmax = decode(tmp_path / "a.png", "minmax")
    assert (minmax == np.rint((values - 100) * 255 / (60000 - 100))).all()
    low, high = np.percentile(values, [1, 99])
    percentile = decode(tmp_path / "a.png", "percentile[1,99]")
    assert (percentile == np.rint(np.clip((values - low) * 255 / (high - low), 0, 255))).all()
    assert percentile.std() > 3 * minmax.std()  # the outliers no longer squeeze the band
    window = decode(tmp_path / "a.png", "window[15000,12000]")
    assert window[0, 0] == 0 and window[0, 1] == 255
    assert abs(int(window[5, 5]) - round((values[5, 5] - 9000) * 255 / 12000)) <= 1


def test_float_tiff_and_sixteen_bit_tiff(tmp_path):
    floats = np.linspace(-3.0, 5.0, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    assert decode(tmp_path / "f.tif", "auto").tolist() == to_8bit(floats, "minmax").tolist()
    assert decode(tmp_path / "f.tif", "window[1,4]")[0, 0] == 0
    wide = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    Image.fromarray(wide).save(tmp_path / "w.tif")
    assert decode(tmp_path / "w.tif", "minmax")[-1, -1] == 255


def test_eight_bit_images_are_never_rescaled(tmp_path):
    Image.fromarray(np.full((4, 4), 7, dtype=np.uint8)).save(tmp_path / "e.png")
    assert (decode(tmp_path / "e.png", "minmax") == 7).all()


@pytest.mark.parametrize("bad", ["percentile[99,1]", "window[40]", "window[40,0]", "gamma", "minmax[1,2]", "percentile[a,b]"])
def test_bad_policies_are_one_line_errors(bad):
    with pytest.raises(VisionFTError) as info:
        parse_intensity(bad)
    assert "\n" not in str(info.value) and bad in str(info.value)
    with pytest.raises(VisionFTError, match="data.intensity"):
        build_config(None, [f"data.intensity={bad}"])


def test_spec_round_trips():
    for text in ("auto", "minmax", "percentile[0.5,99.5]", "window[40,400]"):
        assert parse_intensity(parse_intensity(text).spec) == parse_intensity(text)
    assert parse_intensity("percentile").spec == "percentile[1,99]"
