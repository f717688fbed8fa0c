"""The artifact guard on synthetic cells: noise, background and the DNA stain's gain are flagged,
morphology is not; and the guard on every frame of a sweep."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from diffex.data.measure import DEFAULT_CHANNELS
from diffex.data.spec import load_spec
from diffex.data.synth import render_cell, sample_factors
from diffex.errors import DiffexError
from diffex.explain.guard import (
    GAIN_QUANTITY,
    artifact_flags,
    artifact_measures,
    artifact_z,
    flagged_frames,
    imaging_drift,
    reference_spread,
    sweep_checks,
)

GAIN = DEFAULT_CHANNELS["nucleus"]


Render = Callable[[Callable[[dict], dict]], np.ndarray]


def _synthetic(seed: int) -> tuple[np.ndarray, Render]:
    """80 real cells (both conditions), and a renderer of 8 control cells, each with its own
    seed, with some factors changed (``extra(factors) -> changed factors``)."""
    spec, size = load_spec(None), 32
    rng = np.random.default_rng(seed)
    real = np.stack(
        [
            render_cell(f, size, rng)
            for c in spec.condition_names
            for f in sample_factors(spec, c, 40, rng)
        ]
    )
    facs = sample_factors(spec, "control", 8, np.random.default_rng(seed + 1))

    def render(extra: Callable[[dict], dict]) -> np.ndarray:
        return np.stack(
            [
                render_cell({**f, **extra(f)}, size, np.random.default_rng(100 * (seed + 1) + i))
                for i, f in enumerate(facs)
            ]
        )

    return real, render


@pytest.fixture(scope="module")
def cells():
    """Real reference cells, and 8 control cells rendered three ways with the same seeds."""
    real, render = _synthetic(0)
    recon = render(lambda f: {})
    bigger = render(lambda f: {"nucleus_area": f["nucleus_area"] + 60})
    spots = render(lambda f: {"spot_count": f["spot_count"] + 10})
    noisy = np.clip(recon + np.random.default_rng(5).normal(0, 0.08, recon.shape), 0, 1)
    return reference_spread(real), recon, bigger, spots, noisy


@pytest.fixture(scope="module")
def stain():
    """Real cells' spread with the nucleus channel's gain, and control cells rendered at their
    own brightness (the stain's gain, natural sd 0.12), at 0.5 of it, and with the nucleus
    grown and shrunk."""
    real, render = _synthetic(2)
    recon = render(lambda f: {})
    dim = render(lambda f: {"brightness": 0.5 * f["brightness"]})
    bigger = render(lambda f: {"nucleus_area": f["nucleus_area"] + 60})
    smaller = render(lambda f: {"nucleus_area": f["nucleus_area"] - 60})
    return reference_spread(real, GAIN), recon, dim, (bigger, smaller)


def test_noise_edit_is_flagged_morphology_edits_are_not(cells):
    spread, recon, bigger, spots, noisy = cells
    flags = artifact_flags(artifact_measures(recon, noisy), spread)
    assert any(f.startswith("high-frequency energy +") for f in flags), flags
    assert any(f.startswith("noise +") for f in flags), flags
    for edit in (bigger, spots):
        m = artifact_measures(recon, edit)
        assert artifact_flags(m, spread) == [], artifact_z(m, spread)
    z = artifact_z(artifact_measures(recon, noisy), spread)
    assert z["high_frequency"] > 3 and z["noise"] > 3


def test_background_shift_is_flagged(cells):
    spread, recon, *_ = cells
    flags = artifact_flags(artifact_measures(recon, np.clip(recon + 0.06, 0, 1)), spread)
    assert any(f.startswith("background +") for f in flags), flags


def test_artifact_inputs_checked(cells):
    spread, recon, *_ = cells
    with pytest.raises(DiffexError):
        artifact_measures(recon, recon[:2])
    with pytest.raises(DiffexError):
        reference_spread(recon[:1])
    m = artifact_measures(torch.as_tensor(recon), torch.as_tensor(recon))
    assert all(np.allclose(v, 0) for v in m.values())


def test_dimmer_stain_is_flagged_a_bigger_nucleus_is_not(stain):
    spread, recon, dim, resized = stain
    assert GAIN_QUANTITY in spread
    m = artifact_measures(recon, dim, GAIN)
    z = artifact_z(m, spread)
    assert z[GAIN_QUANTITY] < -3, z
    assert any(f.startswith("stain gain -") for f in artifact_flags(m, spread)), z
    for edit in resized:  # a nucleus that grows or shrinks keeps its stain's level
        mb = artifact_measures(recon, edit, GAIN)
        assert abs(artifact_z(mb, spread)[GAIN_QUANTITY]) < 1.5
        assert artifact_flags(mb, spread) == [], artifact_z(mb, spread)
    # without a gain channel the gain is neither measured nor required
    assert GAIN_QUANTITY not in artifact_measures(recon, dim)
    assert GAIN_QUANTITY not in artifact_z(artifact_measures(recon, dim), spread)


def test_gain_channel_checked(stain):
    _, recon, dim, _ = stain
    with pytest.raises(DiffexError, match="gain channel 3"):
        artifact_measures(recon, dim, 3)
    with pytest.raises(DiffexError, match="gain channel -1"):
        reference_spread(recon, -1)
    with pytest.raises(DiffexError, match="lack 'stain_gain'"):
        artifact_z(artifact_measures(recon, dim, GAIN), reference_spread(recon))


def test_sweep_checks_flag_only_the_frames_that_change_the_imaging(stain):
    spread, recon, dim, (bigger, _) = stain
    noisy = np.clip(recon + np.random.default_rng(6).normal(0, 0.08, recon.shape), 0, 1)
    frames = np.stack([dim, noisy, recon, bigger])
    alphas = [-2.0, -1.0, 0.0, 1.0]
    checks = sweep_checks(frames, alphas, spread, GAIN)
    assert [c["alpha"] for c in checks] == alphas
    assert any(f.startswith("stain gain -") for f in checks[0]["flags"])
    assert any(f.startswith("noise +") for f in checks[1]["flags"])
    assert checks[2]["flags"] == [] and checks[3]["flags"] == []
    assert all(abs(v) < 1e-9 for v in checks[2]["artifacts_sd"].values())
    lines = flagged_frames(checks)
    assert len(lines) == 2 and lines[0].startswith("alpha -2: stain gain -")
    assert flagged_frames(None) == []
    same = sweep_checks(torch.as_tensor(frames), alphas, spread, GAIN)
    assert [c["flags"] for c in same] == [c["flags"] for c in checks]
    with pytest.raises(DiffexError, match="3 alphas"):
        sweep_checks(frames, alphas[:3], spread, GAIN)


def test_imaging_drift_names_imaging_measurements_that_follow_alpha() -> None:
    """Only measurements the acquisition sets count, on either the whole sweep or its half
    towards the target, from |rho| 0.3; cell measurements and NaNs do not."""
    nan = float("nan")
    rows = [
        {"feature": "nucleus_area", "rho_alpha": 0.77, "rho_forward": 0.62},
        {"feature": "brightness", "rho_alpha": 0.356, "rho_forward": -0.111},
        {"feature": "background", "rho_alpha": 0.2, "rho_forward": -0.31},
        {"feature": "offset_x", "rho_alpha": -0.29, "rho_forward": 0.1},
        {"feature": "noise", "rho_alpha": nan, "rho_forward": nan},
        {"feature": "offset_y", "rho_alpha": -0.35},  # no forward half measured
    ]
    assert imaging_drift(rows) == [
        "brightness rho +0.36 (towards the target -0.11)",
        "background rho +0.20 (towards the target -0.31)",
        "offset_y rho -0.35",
    ]
    assert imaging_drift(rows, threshold=0.4) == []
    assert imaging_drift([]) == []


def test_past_the_data_along_the_class_axis() -> None:
    """The training latents' own class-axis range holds (almost) all of them; an edit that
    carries the control cells three class gaps away from the target leaves it, one as long
    across the axis does not; ``past_frames`` names the frames where at least half the cells
    are past it."""
    from diffex.explain.support import PAST_SHARE, axis_range, past_data_share, past_frames
    from diffex.models.directions import LatentSpace

    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    z = torch.randn(400, 8, generator=g) * 2 + 1
    z[:, 0] += 3 * y  # the classes differ along dimension 0
    space = LatentSpace(8, 2).fit(z, y)
    bounds = axis_range(space, z, target=1)
    assert past_data_share(space, z, 1, bounds) <= 0.02
    control = z[y == 0]
    axis = space.towards(1)
    far = space.shift(control, axis, -3.0)
    assert past_data_share(space, far, 1, bounds) > 0.9
    across = torch.zeros(8)
    across[1] = 1.0
    across -= (across @ axis) * axis
    sideways = space.shift(control, across / across.norm(), 3.0)
    assert past_data_share(space, sideways, 1, bounds) <= 0.02
    checks = [{"alpha": -2.0, "past_data": 0.92}, {"alpha": 0.0, "past_data": 0.0}]
    checks.append({"alpha": 2.0, "past_data": PAST_SHARE - 0.01})
    assert past_frames(checks) == ["alpha -2 (92 % of cells)"]
    assert past_frames([{"alpha": 1.0, "flags": []}]) == []  # written before the check
    with pytest.raises(DiffexError, match="two training latents"):
        axis_range(space, z[:1], target=1)
