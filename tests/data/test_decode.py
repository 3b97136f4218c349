"""The shared decoder: pixel modes, bit depths, orientation, resizing, broken files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_ft.data.decode import find_bad_images, load_image
from vision_ft.errors import VisionFTError

SIXTEEN_BIT = np.array([[0, 257, 1000], [65535, 30000, 128]], dtype=np.uint16)
# The policy: divide by 257 and round to nearest.
SIXTEEN_BIT_AS_8 = np.array([[0, 1, 4], [255, 117, 0]], dtype=np.uint8)


def noise_jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_grayscale_to_three_and_one_channel(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png", channels=3)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert (rgb == gray[:, :, None]).all()  # replicated
    one = load_image(tmp_path / "g.png", channels=1)
    assert one.shape == (6, 8, 1)
    assert (one[:, :, 0] == gray).all()


def test_colour_to_one_channel_uses_luma(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    assert load_image(tmp_path / "red.png", channels=1)[0, 0, 0] == 76  # 0.299 * 255


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [255, 0, 0]  # opaque: unchanged
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent: white
    assert np.allclose(out[0, 2], 127, atol=1)  # half black over white


def test_gray_with_alpha_stays_gray(tmp_path):
    pixels = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png", channels=1)[0, :, 0].tolist() == [255, 0]


def test_palette_images(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0].tolist() == [[0, 0, 255], [0, 255, 0]]
    palette_image.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    assert load_image(tmp_path / "pt.png")[0].tolist() == [[255, 255, 255], [0, 255, 0]]


@pytest.mark.parametrize("name", ["sixteen.png", "sixteen.tif"])
def test_sixteen_bit_is_divided_by_257(tmp_path, name):
    Image.fromarray(SIXTEEN_BIT).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode.startswith("I")
    out = load_image(tmp_path / name, channels=1)
    assert out[:, :, 0].tolist() == SIXTEEN_BIT_AS_8.tolist()


def test_big_endian_sixteen_bit_tiff(tmp_path):
    Image.frombytes("I;16B", (3, 2), SIXTEEN_BIT.astype(">u2").tobytes()).save(tmp_path / "be.tif")
    assert load_image(tmp_path / "be.tif", channels=1)[:, :, 0].tolist() == SIXTEEN_BIT_AS_8.tolist()


def test_float_image_is_min_max_scaled(tmp_path):
    Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif", channels=1)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[0, 0, 2] < 60  # red


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated by 90 degrees
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (40, 20, 3)


def test_resize_square_and_rectangular(tmp_path):
    noise_jpeg(tmp_path / "n.jpg", size=(64, 48))
    assert load_image(tmp_path / "n.jpg", size=32).shape == (32, 32, 3)
    assert load_image(tmp_path / "n.jpg", channels=1, size=(24, 16)).shape == (24, 16, 1)


def test_arrays_and_pil_images(tmp_path):
    assert load_image(np.full((5, 7), 9, np.uint8)).shape == (5, 7, 3)
    assert load_image(SIXTEEN_BIT[:, :, None], channels=1)[:, :, 0].tolist() == SIXTEEN_BIT_AS_8.tolist()
    assert load_image(np.zeros((5, 7, 3), np.uint8), channels=1, size=4).shape == (4, 4, 1)
    assert load_image(Image.new("L", (3, 2), 200))[0, 0].tolist() == [200, 200, 200]
    # Float arrays go through the intensity policy (auto: min-max per image); other dtypes are refused.
    assert load_image(np.array([[0.5, 1.5], [2.5, 3.5]]), channels=1)[:, :, 0].tolist() == [[0, 85], [170, 255]]
    with pytest.raises(VisionFTError, match="dtype complex128"):
        load_image(np.zeros((4, 4), dtype=complex))
    with pytest.raises(VisionFTError, match="channels=2"):
        load_image(np.zeros((4, 4), np.uint8), channels=2)


def test_corrupt_and_truncated_files(tmp_path):
    good = noise_jpeg(tmp_path / "good.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    missing = tmp_path / "missing.png"

    bad = find_bad_images([good, corrupt, truncated, missing], workers=2)
    assert [path for path, _ in bad] == [corrupt, truncated, missing]
    reasons = dict(bad)
    assert reasons[corrupt] == "not a recognised image format"
    assert reasons[truncated] == "truncated JPEG"
    assert reasons[missing] == "file not found"

    for path in (corrupt, truncated):
        with pytest.raises(VisionFTError) as caught:
            load_image(path)
        message = str(caught.value)
        assert str(path) in message and "remove or replace the file" in message and "\n" not in message


def test_truncated_real_jpeg(neu_det, tmp_path):
    original = sorted((neu_det / "scratches").glob("*.jpg"))[0]
    assert find_bad_images([original]) == []
    half = tmp_path / original.name
    half.write_bytes(original.read_bytes()[: original.stat().st_size // 2])
    assert find_bad_images([half], workers=1) == [(half, "truncated JPEG")]
    image = load_image(original, channels=1)
    assert image.shape == (200, 200, 1)


def test_decode_module_needs_no_torch():
    code = (
        "import sys, vision_ft.data.decode\n"
        "bad = [m for m in ('torch', 'albumentations', 'cv2') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_real_pneumoniamnist_arrays(shared_data):
    archive = shared_data / "pneumoniamnist.npz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    with np.load(archive) as data:
        images = data["val_images"][:8]
    assert images.shape == (8, 28, 28) and images.dtype == np.uint8
    for image in images:
        same = load_image(image, channels=1)
        assert same[:, :, 0].tolist() == image.tolist()  # no resize: pixels untouched
        bigger = load_image(image, channels=3, size=56)
        assert bigger.shape == (56, 56, 3)
        assert abs(float(bigger.mean()) - float(image.mean())) < 2.0
