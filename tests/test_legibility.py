"""Legibility of edits on rendered cells: a change of one cell factor is legible, a change of the
imaging is not, and a mixture of small changes is less legible than one clear change."""

from __future__ import annotations

import numpy as np
import pytest

from diffex.data.spec import load_spec
from diffex.data.synth import render_cell, sample_factors
from diffex.explain.legibility import (
    CELL_MEASUREMENTS,
    class_gaps,
    edit_measurements,
    paired_change,
)


def test_paired_change_by_hand() -> None:
    mean, consistency, n = paired_change(np.array([1.0, 2.0, 3.0, np.nan]), [2.0, 4.0, 4.0, 5.0])
    # changes 1, 2, 1 (the NaN cell is left out): mean 4/3, sd 0.5774
    assert n == 3 and mean == pytest.approx(4 / 3)
    assert consistency == pytest.approx((4 / 3) / np.sqrt(1 / 3))
    assert paired_change(np.ones(3), np.ones(3) + 2)[1] == np.inf  # the same change in every cell
    assert paired_change(np.ones(3), np.ones(3))[1] == 0.0
    assert paired_change(np.array([1.0]), np.array([2.0]))[1:] == (0.0, 1)


def test_imaging_and_rotation_never_count() -> None:
    assert "nucleus_area" in CELL_MEASUREMENTS and "actin_intensity" in CELL_MEASUREMENTS
    for name in ("background", "noise", "brightness", "offset_x", "offset_y", "rotation"):
        assert name not in CELL_MEASUREMENTS


def test_class_gaps_keep_only_gaps_the_readout_counts() -> None:
    """As in the morphology readout: no gap for a missing measurement, an equal mean, or a
    difference under 0.2 pooled sds (here cell area: 2 against an sd of 20)."""

    def row(mean: float, sd: float) -> dict[str, float]:
        return {"mean": mean, "sd": sd, "n": 200}

    stats = {
        "a": {"nucleus_area": row(100, 20), "cell_area": row(500, 20), "elongation": row(1, 0)},
        "b": {"nucleus_area": row(130, 20), "cell_area": row(502, 20), "elongation": row(1, 0)},
    }
    assert class_gaps(stats, "a", "b") == {"nucleus_area": 30.0}


@pytest.fixture(scope="module")
def edits():
    """12 control cells rendered with fixed seeds: unedited; nucleus +60 px in every cell; the
    nucleus and the actin each moved a little, by an amount that varies from cell to cell (as a
    diffusion edit's small changes do); the background raised by 0.08."""
    spec, size = load_spec(None), 48
    facs = sample_factors(spec, "control", 12, np.random.default_rng(3))

    def render(extra) -> np.ndarray:
        return np.stack(
            [
                render_cell({**f, **extra(f)}, size, np.random.default_rng(50 + i))
                for i, f in enumerate(facs)
            ]
        )

    recon = render(lambda f: {})
    clear = render(lambda f: {"nucleus_area": f["nucleus_area"] + 60})
    jitter = np.random.default_rng(4)
    mixed = render(
        lambda f: {
            "nucleus_area": f["nucleus_area"] + jitter.normal(20, 40),
            "actin_intensity": f["actin_intensity"] + jitter.normal(-0.05, 0.1),
        }
    )
    background = np.clip(recon + 0.08, 0, 1)
    edited = np.stack([np.stack([clear, mixed]), np.stack([background, recon])])  # (2, 2, N..)
    return recon, edited


def test_a_clear_one_factor_edit_is_the_most_legible(edits) -> None:
    recon, edited = edits
    gaps = {"nucleus_area": 60.0}
    legibility, changes = edit_measurements(recon, edited, None, None, gaps)
    assert legibility.shape == (2, 2)
    clear, mixed, background, unchanged = legibility.ravel()
    assert clear > 3 and clear > mixed and clear > 2 * background
    assert unchanged == 0.0  # the reconstruction against itself changes nothing
    nucleus = changes[0][0]["nucleus_area"]
    assert nucleus["mean_change"] > 0 and nucleus["consistency"] == pytest.approx(clear)
    assert nucleus["fraction_of_gap"] == pytest.approx(nucleus["mean_change"] / 60.0)
    assert np.isnan(changes[0][0]["cell_area"]["fraction_of_gap"])  # no gap given
    assert set(changes[1][0]) <= set(CELL_MEASUREMENTS)  # background is not a cell measurement
