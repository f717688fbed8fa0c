"""Measurements recover every ground-truth factor from the pixels of generated images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.stats import spearmanr

from diffex.data.images import read_unit
from diffex.data.measure import (
    CIRCULAR,
    FACTOR_MEASURES,
    MEASUREMENTS,
    axial_components,
    channel_roles,
    measure_batch,
    measure_image,
    measure_real,
    spot_noise_floor,
)
from diffex.data.spec import load_spec
from diffex.data.synth import generate, render_cell, sample_factors
from diffex.errors import DiffexError

N, SEED = 600, 0
MIN_ELONGATION_FOR_ROTATION = 1.3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Default spec, 600 images written as 8-bit PNG and read back, measured from pixels."""
    spec = load_spec(None)
    out = generate(spec, tmp_path_factory.mktemp("synth") / "d", N, SEED)
    rows = list(csv.DictReader(open(out / "factors.csv")))
    imgs = np.stack([read_unit(out / r["path"]) for r in rows])
    truth = {f: np.array([float(r[f]) for r in rows]) for f in spec.factors}
    y = np.array([spec.condition_names.index(r["condition"]) for r in rows])
    return spec, imgs, truth, measure_batch(imgs), y


def _rho_table(spec, truth, meas) -> dict[str, float]:
    """Spearman rho per factor. Rotation (axial, period 180 deg): the smaller of the rhos of
    cos(2t) and sin(2t), over cells whose TRUE elongation is >= 1.3 (undefined for round cells)."""
    rhos = {}
    for f in spec.factors:
        gt, me = truth[f], meas[FACTOR_MEASURES[f]]
        if f in CIRCULAR:
            sel = truth["elongation"] >= MIN_ELONGATION_FOR_ROTATION
            (c1, s1), (c2, s2) = axial_components(gt[sel]), axial_components(me[sel])
            rhos[f] = min(spearmanr(c1, c2)[0], spearmanr(s1, s2)[0])
        else:
            rhos[f] = spearmanr(gt, me, nan_policy="omit")[0]
    return rhos


def test_every_factor_is_recovered(data):
    spec, _, truth, meas, _ = data
    rhos = _rho_table(spec, truth, meas)
    table = "\n".join(f"  {f:16s} rho = {r:.3f}" for f, r in rhos.items())
    assert all(r >= 0.9 for r in rhos.values()), f"Spearman rho (truth vs measured):\n{table}"
    for k in MEASUREMENTS:
        assert np.isfinite(meas[k]).all(), f"{k}: NaN measurements"
    assert set(FACTOR_MEASURES) >= set(spec.factors)


def _class_effect(x: np.ndarray, y: np.ndarray) -> float:
    """(mean treated - mean control) / pooled sd."""
    a, b = x[y == 0], x[y == 1]
    return float((b.mean() - a.mean()) / np.sqrt(0.5 * (a.var() + b.var())))


def test_measured_class_differences_follow_the_spec(data):
    """Causal factors move in the spec's direction by at least half the specified shift (in
    sds of the measurement); nuisance factors do not move (|effect| < 0.25 sd; the sampling
    error of the effect at 300 images per class is about 0.08)."""
    spec, _, truth, meas, y = data
    report = []
    ok = True
    for f, fac in spec.factors.items():
        me = meas[FACTOR_MEASURES[f]]
        shift = spec.shift("treated", f)
        if f in CIRCULAR:
            c, s = axial_components(me)
            eff = max(
                abs(c[y == 1].mean() - c[y == 0].mean()), abs(s[y == 1].mean() - s[y == 0].mean())
            )
            good = eff < 0.15
        else:
            eff = _class_effect(me, y)
            if fac.kind == "causal" and shift != 0:
                good = np.sign(eff) == np.sign(shift) and abs(eff) >= 0.5 * abs(shift)
            else:
                good = abs(eff) < 0.25
        ok &= bool(good)
        report.append(
            f"  {f:16s} {fac.kind:8s} shift={shift:+.1f} effect={eff:+.2f} "
            + ("ok" if good else "FAIL")
        )
    assert ok, "measured class effects:\n" + "\n".join(report)


def test_channel_mapping_and_blank_images(data):
    _, imgs, _, meas, _ = data
    img = imgs[0]
    perm = img[[2, 0, 1]]  # spots, DAPI, actin
    m = measure_image(perm, channels={"nucleus": 1, "actin": 2, "spots": 0})
    assert m == pytest.approx({k: meas[k][0] for k in MEASUREMENTS})
    blank = measure_image(np.full((3, 64, 64), 0.05, dtype=np.float32))
    assert all(np.isnan(v) for v in blank.values())
    # a role no channel plays is skipped, the rest is measured the same
    no_spots = measure_image(img, channels={"nucleus": 0, "actin": 1})
    assert np.isnan(no_spots["spot_count"])
    assert no_spots["nucleus_area"] == pytest.approx(meas["nucleus_area"][0])
    with pytest.raises(DiffexError, match="spots=5"):
        measure_image(img, channels={"nucleus": 0, "actin": 1, "spots": 5})
    for fn in (measure_batch, spot_noise_floor, measure_real):
        with pytest.raises(DiffexError, match=rf"{fn.__name__}: .*shape \(3, "):
            fn(img)


def test_measurements_are_scale_free():
    """A 128-px rendering measures in the same 64-px reference units as a 64-px one."""
    from diffex.data.synth import render_cell

    f = {"nucleus_area": 180, "cell_area": 800, "elongation": 1.8, "spot_count": 12}
    m64 = measure_image(render_cell(f, 64, np.random.default_rng(1)))
    m128 = measure_image(render_cell(f, 128, np.random.default_rng(1)))
    for k in ("nucleus_area", "cell_area", "elongation"):
        assert m128[k] == pytest.approx(m64[k], rel=0.1), k
    assert abs(m128["spot_count"] - 12) <= 1 and abs(m64["spot_count"] - 12) <= 1


def test_channel_roles_from_declared_roles_or_names():
    assert channel_roles(["DAPI", "actin", "spots"]) == {"nucleus": 0, "actin": 1, "spots": 2}
    assert channel_roles(["Hoechst 33342", "tubulin", "Phalloidin"]) == {"nucleus": 0, "actin": 2}
    assert channel_roles(["ink"]) == {}
    assert channel_roles(["red", "green", "blue"], ["nucleus", None, "spots"]) == {
        "nucleus": 0,
        "spots": 2,
    }


def test_an_object_without_cell_roles_is_measured_from_all_channels():
    """A digit or a photo: one grey ellipse, no nucleus or spot channel."""
    yy, xx = np.mgrid[:64, :64] + 0.5
    ellipse = ((xx - 36) / 20) ** 2 + ((yy - 32) / 10) ** 2 < 1
    img = np.where(ellipse, 0.8, 0.1)[None].astype(np.float32)
    m = measure_image(img, channels={})
    assert m["cell_area"] == pytest.approx(np.pi * 20 * 10, rel=0.05)
    assert m["elongation"] == pytest.approx(2.0, rel=0.05)
    assert m["offset_x"] == pytest.approx(4.0, abs=0.3)
    assert np.isnan(m["nucleus_area"]) and np.isnan(m["spot_count"])


def test_spot_floor_counts_a_denoised_copy_with_the_real_ruler():
    """A diffusion model's copy of a cell has no pixel noise but faint bumps. Its own noise would
    set the spot threshold near 0 and count the bumps; with the spot-noise floor of the real
    cells it counts the puncta the real cell has."""
    spec = load_spec(None)
    cells = sample_factors(spec, "control", 16, np.random.default_rng(3))
    rngs = [np.random.default_rng(i) for i in range(len(cells))]
    real = np.stack([render_cell(c, 48, r) for c, r in zip(cells, rngs, strict=True)])
    rngs = [np.random.default_rng(i) for i in range(len(cells))]  # the same cells, noise-free
    copy = np.stack(
        [render_cell({**c, "noise": 0.0}, 48, r) for c, r in zip(cells, rngs, strict=True)]
    )
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:48, :48] + 0.5
    for img in copy:  # six faint bumps (a quarter of a typical punctum) near the centre
        for cy, cx in rng.uniform(14, 34, size=(6, 2)):
            img[2] += 0.03 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.8**2))
    floor = spot_noise_floor(real)
    assert floor is not None and floor > 0.005
    n_real = measure_batch(real)["spot_count"]
    own = measure_batch(copy)["spot_count"]
    ruled = measure_batch(copy, spot_floor=floor)["spot_count"]
    assert own.mean() > n_real.mean() + 3
    assert abs(ruled.mean() - n_real.mean()) < 1.5
    assert np.corrcoef(n_real, ruled)[0, 1] > 0.8
    # the floor never lowers a real image's own threshold, so real counts barely move
    assert np.abs(measure_batch(real, spot_floor=floor)["spot_count"] - n_real).mean() < 0.5
    assert spot_noise_floor(real, channels={"nucleus": 0, "actin": 1}) is None
    # one pass over the real cells gives the same floor and the same floor-ruled measurements
    one_pass, floor1 = measure_real(real)
    assert floor1 == floor
    two_pass = measure_batch(real, spot_floor=floor)
    for k in MEASUREMENTS:
        np.testing.assert_array_equal(one_pass[k], two_pass[k])
    assert measure_real(real, channels={"nucleus": 0, "actin": 1})[1] is None


@pytest.mark.parametrize(("reach", "tolerance"), [(1.0, 0.1), (2.5, 0.15)])
def test_nuisance_measurements_stay_put_when_only_causal_factors_move(
    reach: float, tolerance: float
) -> None:
    """Leakage is read off these measurements along a sweep, so they must not confound: cells
    rendered by the generator with every causal factor moved by up to ``reach`` class gaps each
    way (noise and all nuisance factors held) measure the nuisances unchanged (|rho| under
    ``tolerance`` with the move), while the causal factors follow it with the spec's signs.
    2.5 gaps is the demo's whole sweep; there the DNA stain's measured gain drifts a little
    (rho -0.10: a bigger nucleus reads a slightly lower gain), hence the wider tolerance."""
    spec = load_spec(None)
    cells = sample_factors(spec, "control", 24, np.random.default_rng(3))
    gaps = {
        n: (spec.shift("treated", n) - spec.shift("control", n)) * spec.factors[n].scale
        for n in spec.causal
    }
    ts = np.array([-1.0, -0.5, 0.0, 0.5, 1.0]) * reach
    imgs, t_rep = [], []
    for t in ts:
        for i, c in enumerate(cells):
            f = dict(c)
            for n, g in gaps.items():
                f[n] = float(np.clip(f[n] + t * g, spec.factors[n].min, spec.factors[n].max))
            imgs.append(render_cell(f, 48, np.random.default_rng(100 + i), spec.roles))
            t_rep.append(t)
    meas = measure_batch(np.round(np.stack(imgs) * 255) / 255)
    t_rep = np.array(t_rep)

    def rho(feature: str) -> float:
        v = meas[feature]
        ok = np.isfinite(v)
        return float(spearmanr(t_rep[ok], v[ok])[0])

    for n, g in gaps.items():
        assert np.sign(rho(FACTOR_MEASURES[n])) == np.sign(g) and abs(rho(FACTOR_MEASURES[n])) > 0.3
    for n in spec.nuisance:
        if n not in CIRCULAR:
            assert abs(rho(FACTOR_MEASURES[n])) < tolerance, n
