"""A small real data set that ships inside a package: scikit-learn's handwritten digits.

``load_digits`` holds 1,797 real 8x8 scans (UCI optical recognition of handwritten digits,
grey levels 0..16). :func:`prepare_digits` writes chosen digits as upsampled 8-bit PNGs in an
image folder (one subfolder per digit) with a ``dataset.json`` saying the images are upright
(no 90-degree rotations in augmentation: a rotated 3 is not a 3).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffex.errors import DiffexError
from diffex.io.atomic import write_atomic, write_json
from diffex.log import info, track


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (N, 8, 8) float images in [0, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DiffexError(
            "the digits example needs scikit-learn: pip install 'diffex[examples]'"
        ) from None
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(int)


def upsample(img: np.ndarray, size: int) -> np.ndarray:
    """An (8, 8) image in [0, 1] -> (size, size) uint8, bicubic."""
    from skimage.transform import resize

    big = resize(img, (size, size), order=3, mode="edge", anti_aliasing=False)
    return np.round(np.clip(big, 0.0, 1.0) * 255).astype(np.uint8)


def prepare_digits(out: Path, digits: list[int], size: int = 48) -> dict[str, Any]:
    """Write the chosen digits to ``out/<digit>/<index>.png`` plus ``out/dataset.json``."""
    if len(set(digits)) < 2:
        raise DiffexError(f"--digits needs two or more different digits, got {digits}")
    bad = [d for d in digits if not 0 <= d <= 9]
    if bad:
        raise DiffexError(f"--digits must be between 0 and 9, got {bad}")
    if size < 8:
        raise DiffexError(f"--size must be >= 8, got {size}")
    images, labels = load_digit_images()
    out = Path(out)
    counts: dict[str, int] = {}
    for d in sorted(set(digits)):
        shutil.rmtree(out / str(d), ignore_errors=True)
    chosen = [i for i in range(len(labels)) if labels[i] in digits]
    for i in track(chosen, "writing digits", total=len(chosen)):
        label = str(labels[i])
        path = out / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        png = Image.fromarray(upsample(images[i], size))
        write_atomic(path, lambda p, png=png: png.save(p, format="PNG"))
        counts[label] = counts.get(label, 0) + 1
    write_json(
        out / "dataset.json",
        {
            "name": "scikit-learn digits",
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten "
            "digits), 8x8 upsampled bicubically",
            "size": size,
            "channels": [{"name": "ink", "color": "#ffffff"}],
            "orientation": "upright",
            "counts": counts,
        },
    )
    info(f"digits: {sum(counts.values())} images ({counts}) in {out}")
    return counts
