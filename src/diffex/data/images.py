"""Reading image files (PNG, JPEG, TIFF; 8/16 bit; 1..N channels) as channel-first arrays."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from diffex.errors import DiffexError, brief

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
DEFAULT_MAX_PIXELS = 64_000_000
_limit = {"max_pixels": DEFAULT_MAX_PIXELS}


def set_pixel_limit(max_pixels: int) -> None:
    """Largest image (height x width) any reader accepts from now on (``--max-pixels``)."""
    if max_pixels < 1:
        raise DiffexError(f"--max-pixels must be >= 1, got {max_pixels}")
    _limit["max_pixels"] = int(max_pixels)


def is_image_file(path: Path) -> bool:
    """True for files whose extension DiffEx reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as (C, H, W) in its stored dtype (uint8, uint16 or float).

    Raises a one-line ``DiffexError`` naming the file when it is missing, corrupt,
    truncated, empty, or larger than ``max_pixels`` (default: the limit set by
    ``set_pixel_limit``); the size is checked from the header, before decoding.
    """
    path = Path(path)
    max_pixels = _limit["max_pixels"] if max_pixels is None else max_pixels
    if not path.is_file():
        raise DiffexError(f"image not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in {".tif", ".tiff"}:
            arr = _read_tiff(path, max_pixels)
        elif suffix == ".png":
            arr = _read_png(path, max_pixels)
        elif suffix in {".jpg", ".jpeg"}:
            arr = _read_pil(path, max_pixels)
        else:
            raise DiffexError(f"unsupported image type {suffix!r}: {path}")
    except DiffexError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        raise DiffexError(
            f"cannot read image {path}: corrupt or truncated ({brief(exc, 120)})"
        ) from None
    if arr.size == 0 or min(arr.shape[1:]) == 0:
        raise DiffexError(f"image {path} is empty (shape {arr.shape})")
    if arr.dtype.kind not in "uif":
        raise DiffexError(f"image {path} has unsupported pixel type {arr.dtype}")
    return arr


def read_unit(path: str | Path, n_channels: int | None = None) -> np.ndarray:
    """Read an image as float32 (C, H, W) in [0, 1] (integers divided by their full scale).

    ``n_channels`` keeps only the first channels (e.g. a 2-channel image stored as RGB PNG).
    """
    arr = read_image(path)
    unit = arr.astype(np.float32) / dtype_max(arr.dtype)
    return unit if n_channels is None else unit[:n_channels]


def dtype_max(dtype: np.dtype) -> float:
    """The nominal full-scale value of a pixel type (1.0 for floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    return 1.0


def _check_pixels(path: Path, h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise DiffexError(
            f"image {path} is {w}x{h} = {h * w} pixels, above the limit of {max_pixels}; "
            "crop it first"
        )


def _read_png(path: Path, max_pixels: int) -> np.ndarray:
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DiffexError(f"cannot read image {path}: not a PNG file")
    w, h, depth, color = struct.unpack(">IIBB", head[16:26])
    _check_pixels(path, h, w, max_pixels)
    if depth == 16 and color in (2, 4, 6):
        import png  # pypng: Pillow cannot hold 16-bit colour images

        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
        return data.reshape(height, width, info["planes"]).transpose(2, 0, 1).copy()
    return _read_pil(path, max_pixels)


def _read_pil(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            _check_pixels(path, im.height, im.width, max_pixels)
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in {"1", "CMYK", "YCbCr", "LAB", "HSV"}:
                im = im.convert("L" if im.mode == "1" else "RGB")
            arr = np.asarray(im)
    if arr.dtype == np.int32:  # mode "I" holding 16-bit data
        arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr
    if arr.ndim == 2:
        return arr[None].copy()
    return arr.transpose(2, 0, 1).copy()


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise DiffexError(f"cannot read image {path}: TIFF holds no image")
        series = tif.series[0]
        axes = series.axes
        shape = series.shape
        plane = {a: s for a, s in zip(axes, shape, strict=True)}
        _check_pixels(path, int(plane.get("Y", 1)), int(plane.get("X", 1)), max_pixels)
        arr = series.asarray()
    return _to_chw(arr, axes, path)


def _to_chw(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Bring a TIFF array to (C, H, W) using its axes, falling back to shape."""
    if len(axes) == arr.ndim:
        keep = [
            i for i, (a, n) in enumerate(zip(axes, arr.shape, strict=True)) if n > 1 or a in "YX"
        ]
        arr = arr.reshape([arr.shape[i] for i in keep])
        axes = "".join(axes[i] for i in keep)
    else:
        arr, axes = np.squeeze(arr), ""
    if arr.ndim == 2:
        return arr[None].copy()
    if arr.ndim != 3:
        raise DiffexError(f"image {path} has shape {arr.shape}; expected 2D with optional channels")
    if axes.endswith("YX"):
        return arr.copy()
    if axes.startswith("YX"):
        return arr.transpose(2, 0, 1).copy()
    # Unknown axes: the channel axis is the smaller one at either end.
    if arr.shape[0] <= arr.shape[-1]:
        return arr.copy()
    return arr.transpose(2, 0, 1).copy()
