"""How legibly each (direction, sign) edit changes the cell, measured on the decoded edits.

The ranking's first criterion is how much an edit moves the classifier (delta-p). Where the
classifier responds to several attributes, an edit that moves each of them a little can raise
p(target) slightly more than one that moves a single attribute clearly, yet it explains less:
no one measurement follows it from cell to cell (BENCHMARKS: "Legible edits"). So every edit
the rank stage decodes is also measured (:mod:`diffex.data.measure`) against its unedited
reconstruction, and its *legibility* is the largest paired effect size over the cell's own
measurements: for each measurement, |mean change| / sd of the change over the source images,
i.e. how consistently, cell by cell, the edit moves it. Imaging measurements (where the cell
sits, background, noise, the stain's gain) and axial ones (rotation) never count towards it:
an edit is not made legible by changing the acquisition.

The rank stage uses it only when asked (``--legible-within``): among the edits that raise
p(target) by at least ``1 - tolerance`` times the best one, the most legible is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffex.data.loading import DataPlan, load_split
from diffex.data.measure import (
    CIRCULAR,
    IMAGING_MEASUREMENTS,
    MEASUREMENTS,
    measure_batch,
    measure_real,
)
from diffex.explain.figures import feature_stats, real_gap

#: Measurements that count towards legibility: the cell's own, not the acquisition's.
CELL_MEASUREMENTS: tuple[str, ...] = tuple(
    m for m in MEASUREMENTS if m not in IMAGING_MEASUREMENTS and m not in CIRCULAR
)


def real_class_stats(plan: DataPlan) -> tuple[dict[str, Any], float | None]:
    """Measurements of real held-out cells per class (validation split), measured once, and
    the spot-noise floor of those cells (:func:`diffex.data.measure.measure_real`) that
    generated images are measured with."""
    data = load_split(plan, "val")
    measured, floor = measure_real(plan.normalization.to_unit(data.x), plan.measure_channels)
    y = data.y.numpy()
    stats = {
        c: feature_stats({k: v[y == i] for k, v in measured.items()})
        for i, c in enumerate(plan.classes)
        if (y == i).any()
    }
    return stats, floor


def paired_change(before: np.ndarray, after: np.ndarray) -> tuple[float, float, int]:
    """(mean change, consistency = |mean| / sd of the change, cells) over the cells measured
    both times; consistency is 0 with fewer than two such cells, inf for an exact constant
    non-zero change."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan"), 0.0, int(d.size)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return mean, (0.0 if mean == 0 else float("inf")), int(d.size)
    return mean, abs(mean) / sd, int(d.size)


def edit_measurements(
    recon_unit: np.ndarray,
    edited_unit: np.ndarray,
    channels: Mapping[str, int] | None,
    spot_floor: float | None,
    class_gap: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, list[list[dict[str, dict[str, float]]]]]:
    """Measure every edit against the reconstruction.

    ``recon_unit`` (N, C, H, W) and ``edited_unit`` (K, 2, N, C, H, W), both in [0, 1].
    Returns ``(legibility (K, 2), changes)`` where ``changes[k][s]`` maps each cell measurement
    (:data:`CELL_MEASUREMENTS`) to its mean change, consistency and, where ``class_gap`` gives
    the gap between the class means, the change as a fraction of it."""
    k_dirs, n_signs = edited_unit.shape[:2]
    m0 = measure_batch(recon_unit, channels, spot_floor=spot_floor)
    legibility = np.zeros((k_dirs, n_signs))
    changes: list[list[dict[str, dict[str, float]]]] = []
    for k in range(k_dirs):
        row = []
        for si in range(n_signs):
            m1 = measure_batch(edited_unit[k, si], channels, spot_floor=spot_floor)
            entry: dict[str, dict[str, float]] = {}
            for f in CELL_MEASUREMENTS:
                mean, consistency, n = paired_change(m0[f], m1[f])
                if n < 2:
                    continue
                gap = (class_gap or {}).get(f)
                entry[f] = {
                    "mean_change": mean,
                    "consistency": consistency,
                    "fraction_of_gap": mean / gap if gap else float("nan"),
                }
                legibility[k, si] = max(legibility[k, si], consistency)
            row.append(entry)
        changes.append(row)
    return legibility, changes


def class_gaps(stats: Mapping[str, Any], source: str, target: str) -> dict[str, float]:
    """Target minus source class mean of each cell measurement in which the classes differ
    (:func:`diffex.explain.figures.real_gap`, the morphology readout's rule)."""
    out = {}
    for f in CELL_MEASUREMENTS:
        gap = real_gap(stats.get(source, {}).get(f, {}), stats.get(target, {}).get(f, {}))
        if gap is not None:
            out[f] = gap
    return out
