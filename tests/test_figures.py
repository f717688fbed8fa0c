"""Direction figures: each writes a non-empty file of the right type; the morphology readout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from diffex.data.loading import DataPlan, Normalization
from diffex.data.spec import load_spec
from diffex.data.synth import render_cell, sample_factors
from diffex.errors import DiffexError
from diffex.explain.explain import factor_trends
from diffex.explain.figures import (
    alpha_strip,
    channel_panels,
    class_feature_stats,
    difference_map,
    morphology_readout,
    morphology_table_png,
    probability_curve,
    sweep_gif,
)

torch.set_num_threads(1)

ALPHAS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])


def make_plan(c: int = 3) -> DataPlan:
    norm = Normalization(mode="dataset").fit(np.tile(np.linspace(0, 1, 16), (2, c, 4, 4)))
    return DataPlan(
        source="test",
        classes=["control", "treated"],
        channel_names=["DAPI", "actin", "spots"][:c],
        channel_colors=["#3b6cff", "#3bd15a", "#ff4fd8"][:c],
        image_size=16,
        normalization=norm,
        splits={},
        labels={},
    )


@pytest.fixture(scope="module")
def sweep():
    """5 alphas x 3 cells x 3 channels x 16 px: a blob that grows with alpha, in [-1, 1]."""
    yy, xx = np.mgrid[:16, :16] - 7.5
    frames = np.zeros((len(ALPHAS), 3, 3, 16, 16), dtype=np.float32)
    for j, a in enumerate(ALPHAS):
        for i in range(3):
            disc = (np.hypot(yy, xx) < 4 + a + 0.5 * i).astype(np.float32)
            frames[j, i] = disc * np.array([0.9, 0.5, 0.3])[:, None, None] * 2 - 1
    probs = 1 / (1 + np.exp(-(ALPHAS[:, None] + np.array([[-0.5, 0.0, 0.5]]))))
    return torch.from_numpy(frames), ALPHAS, probs


def _png(path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    im = Image.open(path)
    assert im.format == "PNG"
    return im


def test_alpha_strip(tmp_path, sweep):
    frames, alphas, probs = sweep
    out = alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "s.png", "dir 3 +")
    assert _png(out).size[0] > 100
    with pytest.raises(DiffexError, match="probs"):
        alpha_strip(frames, alphas, probs[:, :2], make_plan(), tmp_path / "x.png", "")


def test_flagged_columns_are_marked(tmp_path, sweep):
    """A flagged column is outlined in red: the strip differs from the unflagged one there."""
    frames, alphas, probs = sweep
    n = len(alphas)
    flags = [["stain gain -8.6 sd"]] + [[] for _ in range(n - 1)]
    plain = alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "a.png")
    marked = alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "b.png", flags=flags)
    a, b = (np.asarray(_png(x).convert("RGB"), dtype=int) for x in (plain, marked))

    def red(im: np.ndarray) -> np.ndarray:
        return (im[..., 0] > 180) & (im[..., 1] < 80) & (im[..., 2] < 80)

    assert red(b).sum() > 50 and not red(a).any()
    with pytest.raises(DiffexError, match="flag lists"):
        alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "c.png", flags=flags[:1])
    gif = sweep_gif(frames, alphas, probs, make_plan(), tmp_path / "s.gif", flags=flags)
    assert Image.open(gif).n_frames == 2 * n - 2


def test_columns_past_the_data_are_marked(tmp_path, sweep):
    """A column past the training data gets its "~" mark and a line under the title (the strip
    differs from the unmarked one), the GIF still renders, and a wrong count of marks is an
    error."""
    frames, alphas, probs = sweep
    n = len(alphas)
    past = [True] + [False] * (n - 1)
    plain = alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "a.png")
    marked = alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "b.png", past=past)
    a, b = (np.asarray(_png(x).convert("L"), dtype=int) for x in (plain, marked))
    assert a.shape != b.shape or (a != b).any()
    with pytest.raises(DiffexError, match="past-the-data marks"):
        alpha_strip(frames, alphas, probs, make_plan(), tmp_path / "c.png", past=past[:1])
    gif = sweep_gif(frames, alphas, probs, make_plan(), tmp_path / "s.gif", past=past)
    assert Image.open(gif).n_frames == 2 * n - 2


def test_sweep_gif_has_ping_pong_frames(tmp_path, sweep):
    frames, alphas, probs = sweep
    out = sweep_gif(frames, alphas, probs, make_plan(), tmp_path / "s.gif", fps=5)
    im = Image.open(out)
    assert im.format == "GIF" and im.n_frames == 2 * len(alphas) - 2
    assert im.info.get("loop") == 0


def test_probability_curve(tmp_path, sweep):
    _, alphas, probs = sweep
    _png(probability_curve(alphas, probs, tmp_path / "c.png", "treated"))
    with pytest.raises(DiffexError):
        probability_curve(alphas[:3], probs, tmp_path / "x.png", "treated")


def test_difference_map_and_channel_panels(tmp_path, sweep):
    frames, alphas, _ = sweep
    _png(difference_map(frames, alphas, make_plan(), tmp_path / "d.png"))
    _png(channel_panels(frames, alphas, make_plan(), tmp_path / "p.png", cell=1))
    one = frames[:, :, :1]  # single channel, only non-negative alphas
    _png(channel_panels(one[2:], alphas[2:], make_plan(1), tmp_path / "p1.png"))
    _png(difference_map(one, alphas, make_plan(1), tmp_path / "d1.png"))
    with pytest.raises(DiffexError, match="cell"):
        channel_panels(frames, alphas, make_plan(), tmp_path / "x.png", cell=9)


@pytest.fixture(scope="module")
def readout():
    """8 control cells at 32 px, unedited and with a nucleus 60 px^2 larger (same seeds)."""
    spec, size = load_spec(None), 32
    facs = sample_factors(spec, "control", 8, np.random.default_rng(1))

    def render(extra):
        return np.stack(
            [
                render_cell({**f, **extra(f)}, size, np.random.default_rng(100 + i))
                for i, f in enumerate(facs)
            ]
        )

    rng = np.random.default_rng(2)
    real = {
        c: np.stack([render_cell(f, size, rng) for f in sample_factors(spec, c, 30, rng)])
        for c in spec.condition_names
    }
    u0 = render(lambda f: {})
    u1 = render(lambda f: {"nucleus_area": f["nucleus_area"] + 60})
    rows = morphology_readout(u0, u1, real, "control", "treated", n_boot=200, seed=0)
    return rows, u0, u1, real


def test_morphology_readout_nucleus(readout):
    rows, *_ = readout
    by = {r["feature"]: r for r in rows}
    assert "rotation" not in by
    nuc = by["nucleus_area"]
    assert nuc["n"] == 8
    assert nuc["pct_change"] > 15 and nuc["pct_ci_low"] > 0
    assert nuc["pct_ci_low"] <= nuc["pct_change"] <= nuc["pct_ci_high"]
    # the shift (60 px^2) is a bit more than the class gap (1.8 sd = 45 px^2)
    assert 0.6 < nuc["fraction_of_gap"] < 3.0
    # unrelated measurements barely move compared with their gap
    assert abs(by["spot_count"]["change"]) < 1.0
    assert np.isnan(by["offset_x"]["pct_change"]) and np.isfinite(by["offset_x"]["change"])


def test_morphology_readout_with_precomputed_stats(readout, tmp_path):
    rows, u0, u1, real = readout
    stats = class_feature_stats(real)
    rows2 = morphology_readout(u0, u1, stats, "control", "treated", n_boot=200, seed=0)
    assert [r["feature"] for r in rows2] == [r["feature"] for r in rows]
    np.testing.assert_allclose(
        [r["fraction_of_gap"] for r in rows2], [r["fraction_of_gap"] for r in rows], equal_nan=True
    )
    means = {c: {k: v["mean"] for k, v in s.items()} for c, s in stats.items()}
    rows3 = morphology_readout(u0, u1, means, "control", "treated", n_boot=50)
    assert np.isfinite({r["feature"]: r for r in rows3}["nucleus_area"]["fraction_of_gap"])
    with pytest.raises(DiffexError, match="mutant"):
        morphology_readout(u0, u1, stats, "control", "mutant")
    out = morphology_table_png(rows, tmp_path / "m.png", "direction 3 +")
    _png(out)


def test_factor_trends_separate_the_half_towards_the_target():
    """Nucleus area grows over the whole sweep; the DNA stain dims only at negative alpha (an
    extrapolation away from the target). ``rho`` sees both, ``rho_forward`` only the growth."""
    spec = load_spec(None)
    cells = sample_factors(spec, "control", 8, np.random.default_rng(0))
    alphas = np.linspace(-1, 1, 5)
    frames = np.stack(
        [
            np.stack(
                [
                    render_cell(
                        {
                            **c,
                            "nucleus_area": c["nucleus_area"] * (1 + 0.4 * a),
                            "brightness": c["brightness"] * (1 + 0.4 * min(a, 0.0)),
                        },
                        48,
                        np.random.default_rng(i),
                    )
                    for i, c in enumerate(cells)
                ]
            )
            for a in alphas
        ]
    )
    trends = factor_trends(frames, alphas)
    assert trends["nucleus_area"]["rho"] > 0.8 and trends["nucleus_area"]["rho_forward"] > 0.8
    assert trends["brightness"]["rho"] > 0.5
    assert abs(trends["brightness"]["rho_forward"]) < 0.3
    assert "rotation" not in trends


class _MetaStandsInForAGPU(TorchFunctionMode):
    """A copy out of the 'meta' device (a stand-in for a GPU: it computes shapes, and fails on
    any operation that mixes it with CPU tensors) gives zeros on the CPU, as a GPU result
    copied back would give numbers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].device.type == "meta":
            dest = args[1] if len(args) > 1 else kwargs.get("device")
            dest = dest.device if isinstance(dest, torch.Tensor) else dest
            if isinstance(dest, str | torch.device) and torch.device(dest).type != "meta":
                return torch.zeros(args[0].shape, dtype=args[0].dtype, device=dest)
        return func(*args, **kwargs)


def test_edits_are_computed_on_the_space_device_and_returned_on_the_latents_device() -> None:
    """Latents come from the encoder cache (CPU) while the direction space lives on the run's
    device (a GPU): every edit must be computed where the space is and handed back on the
    latents' device, without callers moving tensors. This failed on CUDA in the explain stage."""
    from diffex.explain.explain import sweep
    from diffex.models.directions import (
        DirectionModelConfig,
        DirectionModels,
        LatentEditor,
        LatentSpace,
    )

    z = torch.randn(5, 4)
    space = LatentSpace(4, 2).fit(z, torch.tensor([0, 0, 1, 1, 1]))
    editor = LatentEditor(space, DirectionModels(DirectionModelConfig(4, k=2, hidden=8))).eval()
    editor.to("meta")
    seen: list[str] = []

    class AE:
        def decode(self, zz, x_T, steps, batch_size):  # type: ignore[no-untyped-def]
            seen.extend([zz.device.type, x_T.device.type])
            return torch.zeros(len(zz), 1, 2, 2)

    x_T = torch.zeros(5, 1, 2, 2)
    with torch.no_grad(), _MetaStandsInForAGPU():
        unit = space.towards(1)
        assert unit.device.type == "meta"
        outs = [
            editor.edit(z, 1, -1, 2.0),
            editor.edit_along(z, unit, 1.5),
            editor.edit_along(z, unit, torch.linspace(0, 1, 5)),
            space.shift(z, lambda zs: editor.directions.unit(zs, 0), 1.0),
        ]
        assert all(o.device.type == "cpu" and o.shape == (5, 4) for o in outs)
        assert editor.units(z).device.type == "cpu" and editor.units(z).shape == (2, 5, 4)
        units = lambda zs: editor.directions.unit(zs, 0)  # noqa: E731
        frames = sweep(AE(), space, z, x_T, units, np.array([-1.0, 0.0, 1.0]), 5, 8)  # type: ignore[arg-type]
    assert frames.shape == (3, 5, 1, 2, 2)
    assert set(seen) == {"cpu"}


def test_shift_moves_alpha_class_gaps_along_the_unit_vector() -> None:
    """LatentSpace.shift in numbers: standardised z moves by alpha * gap along the unit."""
    from diffex.models.directions import LatentSpace

    z = torch.randn(6, 3) * torch.tensor([1.0, 2.0, 3.0]) + 1.0
    space = LatentSpace(3, 2).fit(z, torch.tensor([0, 0, 0, 1, 1, 1]))
    unit = torch.tensor([0.0, 1.0, 0.0])
    moved = space.shift(z, unit, torch.tensor([0.0, 1, 2, 3, 4, 5]))
    step = space.standardise(moved) - space.standardise(z)
    want = torch.arange(6.0)[:, None] * float(space.gap) * unit
    assert torch.allclose(step, want, atol=1e-5)
    assert torch.allclose(
        space.shift(z, lambda zs: -unit.expand_as(zs), 0.5), space.shift(z, unit, -0.5)
    )


def test_prune_stale_removes_only_earlier_explanations(tmp_path: Path) -> None:
    """A rerun of explain drops the folders of directions no longer ranked, keeps the current
    ones and anything that is not an explanation folder."""
    from diffex.explain.explain import prune_stale

    for name in ("rank1_dir17+", "rank1_dir7+", "reference_class_mean", "notes"):
        (tmp_path / name).mkdir()
        if name != "notes":
            (tmp_path / name / "summary.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    removed = prune_stale(tmp_path, {"rank1_dir17+", "reference_class_mean"})
    assert removed == ["rank1_dir7+"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes",
        "rank1_dir17+",
        "reference_class_mean",
        "summary.json",
    ]
