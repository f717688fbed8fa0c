"""False-colour display of multi-channel images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffex.errors import DiffexError

#: Colours used when a dataset does not name any (DAPI-blue, actin-green, spots-magenta, ...).
DEFAULT_COLORS = ("#3b6cff", "#3bd15a", "#ff4fd8", "#ffb02e", "#2ee6ff", "#ff3b3b")


def hex_to_rgb(color: str) -> np.ndarray:
    """``#rrggbb`` -> float array (3,) in [0, 1]."""
    c = color.lstrip("#")
    if len(c) != 6:
        raise DiffexError(f"colour {color!r} is not #rrggbb")
    try:
        return np.array([int(c[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32) / 255.0
    except ValueError:
        raise DiffexError(f"colour {color!r} is not #rrggbb") from None


def composite(img: np.ndarray, colors: Sequence[str] | None = None) -> np.ndarray:
    """Additive false-colour composite of a (C, H, W) image in [0, 1] -> (H, W, 3) uint8.

    Channel c is painted in ``colors[c]``; overlapping channels add and saturate at white.
    """
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise DiffexError(f"composite expects a (C, H, W) image, got shape {img.shape}")
    if colors is None:
        colors = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(img.shape[0])]
    if len(colors) < img.shape[0]:
        raise DiffexError(f"composite: {img.shape[0]} channels but only {len(colors)} colours")
    rgb = np.stack([hex_to_rgb(c) for c in colors[: img.shape[0]]])  # (C, 3)
    out = np.einsum("chw,ck->hwk", np.clip(img, 0.0, 1.0), rgb)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
