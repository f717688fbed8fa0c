"""Reading PNG / JPEG / TIFF files of 8 and 16 bit with 1, 3 and 4 channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
from PIL import Image

from diffex.data.images import read_image
from diffex.data.loading import Normalization, load_unit_images
from diffex.errors import DiffexError


def _rand(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_png_roundtrip(tmp_path: Path, channels: int, dtype: str) -> None:
    hwc = _rand((20, 24, channels), dtype)
    path = tmp_path / "img.png"
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    bitdepth = 8 if dtype == "uint8" else 16
    png.from_array(hwc.reshape(20, -1), f"{mode};{bitdepth}").save(str(path))
    arr = read_image(path)
    assert arr.shape == (channels, 20, 24)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, hwc.transpose(2, 0, 1))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_tiff_roundtrip(tmp_path: Path, channels: int, dtype: str, layout: str) -> None:
    chw = _rand((channels, 20, 24), dtype, seed=channels)
    data = chw if layout == "first" else chw.transpose(1, 2, 0)
    path = tmp_path / "img.tif"
    if channels == 1:
        data = chw[0]
    tifffile.imwrite(path, data, photometric="minisblack" if layout == "first" else None)
    arr = read_image(path)
    assert arr.shape == (channels, 20, 24)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, chw)


def test_tiff_without_axes_metadata_uses_shape(tmp_path: Path) -> None:
    chw = _rand((5, 30, 30), "uint16")
    path = tmp_path / "five.tiff"
    tifffile.imwrite(path, chw, photometric="minisblack", metadata=None)
    assert read_image(path).shape == (5, 30, 30)


def test_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "img.jpg"
    Image.fromarray(_rand((16, 16, 3), "uint8")).save(path, quality=95)
    arr = read_image(path)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8


@pytest.mark.parametrize(
    "content,suffix",
    [
        (b"not an image at all", ".png"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, ".png"),
        (b"II*\0garbage", ".tif"),
        (b"\xff\xd8\xff\xe0garbage", ".jpg"),
    ],
)
def test_corrupt_files_raise_one_line(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(DiffexError) as err:
        read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.fromarray(_rand((64, 64, 3), "uint8")).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DiffexError, match="t.png"):
        read_image(path)


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(_rand((100, 100), "uint8")).save(path)
    with pytest.raises(DiffexError, match="above the limit"):
        read_image(path, max_pixels=5000)


def test_resize_and_normalise(tmp_path: Path) -> None:
    paths = []
    for i, shape in enumerate([(80, 100, 3), (64, 64, 3)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(_rand(shape, "uint8", seed=i)).save(p)
        paths.append(p)
    unit = load_unit_images(paths, 64)
    assert unit.shape == (2, 3, 64, 64) and unit.min() >= 0 and unit.max() <= 1
    norm = Normalization().fit(unit)
    x = norm.to_model(unit)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == np.float32
    # the inverse recovers the pixels inside the clipping range
    back = norm.to_unit(x)
    inside = (unit >= np.array(norm.low)[None, :, None, None]) & (
        unit <= np.array(norm.high)[None, :, None, None]
    )
    np.testing.assert_allclose(back[inside], unit[inside], atol=1e-5)
