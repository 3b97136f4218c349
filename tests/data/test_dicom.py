"""DICOM decoding on the sample files pydicom ships (rescale, windows, MONOCHROME1, compressed
syntaxes, multi-frame and damaged files)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from vision_ft.data.decode import find_bad_images, load_image  # noqa: E402
from vision_ft.data.dicom import is_dicom_file  # noqa: E402
from vision_ft.data.discover import discover, is_image_file  # noqa: E402
from vision_ft.data.intensity import window_to_8bit  # noqa: E402
from vision_ft.data.pixel_policy import PixelPolicy  # noqa: E402
from vision_ft.errors import VisionFTError  # noqa: E402

# Only files stored inside the pydicom package: get_testdata_file would try to download others.
SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"pydicom's sample {name} is not installed")
    return path


def grey(path: Path, **settings) -> np.ndarray:
    return load_image(path, channels=1, pixels=PixelPolicy.from_settings(**settings))[:, :, 0]


def test_ct_rescale_then_fixed_window():
    path = sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) != 0  # the rescale matters for this file
    got = grey(path, dicom_window=[40, 400])
    assert (got == window_to_8bit(hounsfield, 40, 400)).all()
    # Without a window in the file, "file" falls back to the intensity policy (auto: min-max of HU).
    spread = grey(path)
    assert spread.min() == 0 and spread.max() == 255


def test_mr_uses_the_files_window_and_auto_ignores_it():
    path = sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = window_to_8bit(ds.pixel_array.astype(np.float64), center, width)
    assert (grey(path) == expected).all()
    percentile = grey(path, dicom_window="auto", intensity="percentile[1,99]")
    assert not (percentile == expected).all()
    assert percentile.min() == 0 and percentile.max() == 255


def test_monochrome1_without_extension_is_found_and_inverted(tmp_path):
    source = sample("dicomdirtests/77654033/CR1/6154")
    ds = pydicom.dcmread(source)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and Path(source).suffix == ""
    assert is_dicom_file(source) and is_image_file(source)  # by the DICM preamble
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    window = window_to_8bit(values, float(ds.WindowCenter), float(ds.WindowWidth))
    assert (grey(source) == 255 - window).all()


@pytest.mark.parametrize("compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm",
                                        "MR_small_bigendian.dcm"])
def test_lossless_and_other_syntaxes_equal_the_plain_file(compressed):
    plain = grey(sample("MR_small.dcm"))
    assert (grey(sample(compressed)) == plain).all()


def test_colour_dicom_and_resize():
    rgb = load_image(sample("SC_rgb_rle.dcm"), channels=3, size=32)
    ds = pydicom.dcmread(sample("SC_rgb_rle.dcm"))
    assert rgb.shape == (32, 32, 3)
    assert load_image(sample("SC_rgb_rle.dcm"), channels=3)[5, 5].tolist() == ds.pixel_array[5, 5].tolist()


def test_multi_frame_refused_in_one_line_or_frame_chosen():
    path = sample("rtdose.dcm")
    with pytest.raises(VisionFTError) as info:
        load_image(path)
    message = str(info.value)
    assert "multi-frame DICOM (15 frames)" in message and "data.dicom_frame" in message and "\n" not in message
    third = grey(path, dicom_frame=2)
    frames = pydicom.dcmread(path).pixel_array
    assert (third == grey(path, dicom_frame=2)).all() and third.shape == frames.shape[1:]
    assert not (third == grey(path, dicom_frame=0)).all()
    with pytest.raises(VisionFTError, match="outside the file's 15 frames"):
        grey(path, dicom_frame=15)


def test_corrupt_truncated_and_undecodable_files(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 3)
    truncated = sample("MR_truncated.dcm")
    for path in (junk, truncated):
        with pytest.raises(VisionFTError) as info:
            load_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    bad = dict(find_bad_images([junk, truncated, sample("MR_small.dcm")], workers=2))
    assert set(bad) == {junk, truncated}
    assert "corrupt DICOM" in bad[truncated]


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_syntaxes_decode_with_the_medical_extra(name):
    """12-bit and lossless JPEG need pylibjpeg (the medical extra); without it, one line names it."""
    path = sample(name)
    try:
        import pylibjpeg  # noqa: F401
    except ImportError:
        with pytest.raises(VisionFTError) as info:
            load_image(path, channels=1)
        assert "vision-ft[medical]" in str(info.value) and "\n" not in str(info.value)
        return
    image = load_image(path, channels=1)
    assert image.shape[2] == 1 and image.std() > 0
    if name == "MR_small_jpeg_ls_lossless.dcm":  # lossless: the same pixels as the plain file
        assert (image[:, :, 0] == grey(sample("MR_small.dcm"))).all()


def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(VisionFTError, match=r"vision-ft\[medical\]"):
        load_image(sample("CT_small.dcm"))


def test_discovery_finds_dicom_class_folders(tmp_path):
    for modality, folders in {"ct": ["CT2", "CT5N"], "mr": ["MR1", "MR2"]}.items():
        (tmp_path / modality).mkdir()
        for folder in folders:
            for source in (SAMPLES / "dicomdirtests").glob(f"*/{folder}/*"):
                shutil.copy(source, tmp_path / modality / f"{folder}_{source.name}")
    index = discover(tmp_path)
    assert index.class_names == ["ct", "mr"] and len(index.samples) >= 10 and not index.skipped
