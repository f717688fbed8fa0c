"""Where an edit leaves the data: the share of cells whose edited z_sem lies past the training
latents' range along the class axis.

The decoder was never trained there, and what it draws there is an extrapolation (BENCHMARKS:
"Where the sweep leaves the data"): the explanations mark those frames so that a reader does
not take their imaging changes for the classifier's evidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffex.errors import DiffexError
from diffex.models.directions import LatentSpace

#: Percentiles of the training latents' class-axis coordinate that bound "the data".
RANGE_PERCENTILES = (0.5, 99.5)
#: A frame is past the data when at least this share of its cells is.
PAST_SHARE = 0.5


def axis_coordinate(space: LatentSpace, z: torch.Tensor, target: int) -> np.ndarray:
    """Coordinate of raw latents ``z`` (N, D) along the unit class axis towards ``target``, in
    standardised z."""
    axis = space.towards(target)
    return (space.standardise(z) @ axis).detach().cpu().double().numpy()


def axis_range(space: LatentSpace, z_train: torch.Tensor, target: int) -> tuple[float, float]:
    """The training latents' (N, D) class-axis range between :data:`RANGE_PERCENTILES`."""
    if len(z_train) < 2:
        raise DiffexError("need at least two training latents to bound the data")
    lo, hi = np.percentile(axis_coordinate(space, z_train, target), RANGE_PERCENTILES)
    return float(lo), float(hi)


def past_data_share(
    space: LatentSpace, moved: torch.Tensor, target: int, bounds: tuple[float, float]
) -> float:
    """Share of the edited latents ``moved`` (N, D) whose class-axis coordinate lies outside
    ``bounds`` (:func:`axis_range`)."""
    c = axis_coordinate(space, moved, target)
    return float(np.mean((c < bounds[0]) | (c > bounds[1])))


def past_frames(checks: list[dict[str, Any]] | None) -> list[str]:
    """``"alpha -2.5 (92 % of cells)"`` for each frame of an explanation's ``frame_checks``
    that is past the data (explanations written before this check carry none)."""
    return [
        f"alpha {c['alpha']:+.3g} ({100 * c['past_data']:.0f} % of cells)"
        for c in checks or []
        if c.get("past_data", 0.0) >= PAST_SHARE
    ]
