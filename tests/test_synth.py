"""Synthetic benchmark: spec validation, rendering, dataset layout, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from diffex.data.display import composite
from diffex.data.images import read_unit
from diffex.data.spec import load_spec, packaged_spec_path, parse_spec
from diffex.data.synth import generate, render_cell, sample_factors
from diffex.errors import DiffexError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _spec_dict() -> dict:
    return load_spec(None).to_dict()


def _write_spec(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# --- spec --------------------------------------------------------------------------------------


def test_default_spec_loads_and_round_trips():
    spec = load_spec(None)
    assert spec.condition_names == ["control", "treated"]
    assert [c.name for c in spec.channels] == ["DAPI", "actin", "spots"]
    assert set(spec.causal) == {"nucleus_area", "spot_count", "elongation", "actin_intensity"}
    assert {"rotation", "offset_x", "offset_y", "background", "noise", "brightness"} <= set(
        spec.nuisance
    )
    assert parse_spec(spec.to_dict()) == spec


def _bad_unknown_top(d):
    d["colour_map"] = "x"


def _bad_unknown_factor_key(d):
    d["factors"]["noise"]["median"] = 1


def _bad_type(d):
    d["factors"]["nucleus_area"]["sd"] = "wide"


def _bad_image_size(d):
    d["image_size"] = 64.5


def _bad_one_condition(d):
    d["conditions"] = {"control": {}}


def _bad_unknown_factor(d):
    d["factors"]["mitochondria"] = {"kind": "causal", "mean": 1, "sd": 1, "min": 0, "max": 2}


def _bad_unknown_factor_in_condition(d):
    d["conditions"]["treated"]["golgi_size"] = 1.0


def _bad_nuisance_shift(d):
    d["conditions"]["treated"]["rotation"] = 0.5


def _bad_range(d):
    d["factors"]["elongation"]["min"] = 0.5


def _bad_kind(d):
    d["factors"]["noise"]["kind"] = "maybe"


def _bad_color(d):
    d["channels"][0]["color"] = "blue"


@pytest.mark.parametrize(
    "mutate, key",
    [
        (_bad_unknown_top, "colour_map"),
        (_bad_unknown_factor_key, "factors.noise.median"),
        (_bad_type, "factors.nucleus_area.sd"),
        (_bad_image_size, "image_size"),
        (_bad_one_condition, "conditions"),
        (_bad_unknown_factor, "factors.mitochondria"),
        (_bad_unknown_factor_in_condition, "conditions.treated.golgi_size"),
        (_bad_nuisance_shift, "conditions.treated.rotation"),
        (_bad_range, "factors.elongation"),
        (_bad_kind, "factors.noise.kind"),
        (_bad_color, "channels[0].color"),
    ],
)
def test_spec_validation_names_the_key(tmp_path, mutate, key):
    d = _spec_dict()
    mutate(d)
    with pytest.raises(DiffexError) as err:
        load_spec(_write_spec(tmp_path, d))
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_spec_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(DiffexError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("factors: [unclosed\n")
    with pytest.raises(DiffexError, match="bad.yaml"):
        load_spec(p)


def test_sample_factors_respects_shift_and_clip():
    spec = load_spec(None)
    rng = np.random.default_rng(0)
    ctl = sample_factors(spec, "control", 2000, rng)
    trt = sample_factors(spec, "treated", 2000, rng)
    for f in spec.factors.values():
        for rows in (ctl, trt):
            v = np.array([r[f.name] for r in rows])
            assert v.min() >= f.min and v.max() <= f.max
    area = [np.mean([r["nucleus_area"] for r in rows]) for rows in (ctl, trt)]
    assert area[1] - area[0] > 1.5 * spec.factors["nucleus_area"].sd
    assert all(float(r["spot_count"]).is_integer() for r in ctl)
    with pytest.raises(DiffexError, match="mutant"):
        sample_factors(spec, "mutant", 1, rng)


# --- rendering ---------------------------------------------------------------------------------


def test_render_cell_shape_range_and_roles():
    rng = np.random.default_rng(0)
    img = render_cell({"nucleus_area": 150, "spot_count": 12}, 64, rng)
    assert img.shape == (3, 64, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    # The nucleus is brighter in the centre than in the corners, in the DAPI channel.
    assert img[0, 28:36, 28:36].mean() > img[0, :8, :8].mean() + 0.2
    img4 = render_cell({}, 96, rng, roles=("membrane", "spots", "actin", "nucleus"))
    assert img4.shape == (4, 96, 96)
    with pytest.raises(DiffexError, match="golgi"):
        render_cell({"golgi": 1.0}, 64, rng)
    rgb = composite(img, ["#3b6cff", "#3bd15a", "#ff4fd8"])
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8


# --- generate ----------------------------------------------------------------------------------


def test_generate_layout(tmp_path):
    out = generate(None, tmp_path / "d", 11, seed=3)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["control", "treated"]
    assert len(list((out / "control").glob("control_*.png"))) == 6
    assert len(list((out / "treated").glob("treated_*.png"))) == 5
    assert (out / "control" / "control_00000.png").is_file()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["control", "treated"]
    assert meta["channels"][0] == {"name": "DAPI", "color": "#3b6cff"}
    assert meta["image_size"] == 64 and meta["seed"] == 3 and meta["n"] == 11
    assert meta["generator"] == "diffex synth"
    rows = list(csv.DictReader(open(out / "factors.csv")))
    assert len(rows) == 11
    assert list(rows[0])[:2] == ["path", "condition"]
    assert set(load_spec(None).factors) <= set(rows[0])
    assert all((out / r["path"]).is_file() for r in rows)
    assert load_spec(out / "spec.yaml") == load_spec(None)
    with Image.open(out / "contact_sheet.png") as im:
        assert im.mode == "RGB" and im.width > 500
    # PNG: 8-bit RGB, channel i in R, G, B order.
    with Image.open(out / rows[0]["path"]) as im:
        arr = np.asarray(im)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    img = read_unit(out / rows[0]["path"])
    assert img.shape == (3, 64, 64)
    assert img[0, 28:36, 28:36].mean() > img[0, :8, :8].mean()  # DAPI (R) is the nucleus


def test_generate_is_deterministic(tmp_path):
    a = _files(generate(None, tmp_path / "a", 6, seed=7))
    b = _files(generate(None, tmp_path / "b", 6, seed=7))
    c = _files(generate(None, tmp_path / "c", 6, seed=8))
    assert a == b
    assert a["factors.csv"] != c["factors.csv"]
    assert a["control/control_00000.png"] != c["control/control_00000.png"]
    # Per-image generators: a larger dataset extends a smaller one.
    d = _files(generate(None, tmp_path / "d", 10, seed=7))
    assert d["treated/treated_00002.png"] == a["treated/treated_00002.png"]


def test_generate_tiff_and_channel_limits(tmp_path):
    out = generate(None, tmp_path / "t", 4, seed=0, size=48, fmt="tif")
    f = out / "control" / "control_00000.tif"
    arr = tifffile.imread(f)
    assert arr.shape == (3, 48, 48) and arr.dtype == np.uint16
    assert json.loads((out / "dataset.json").read_text())["image_size"] == 48

    d = _spec_dict()
    d["channels"].append({"name": "WGA", "role": "membrane", "color": "#ffb02e"})
    p = _write_spec(tmp_path, d)
    with pytest.raises(DiffexError, match="tif"):
        generate(p, tmp_path / "png4", 4, seed=0)
    out4 = generate(p, tmp_path / "tif4", 4, seed=0, fmt="tif")
    assert tifffile.imread(out4 / "treated" / "treated_00000.tif").shape == (4, 64, 64)


def test_generate_refuses_non_empty_out(tmp_path):
    out = generate(None, tmp_path / "d", 2, seed=0)
    with pytest.raises(DiffexError, match=str(out)):
        generate(None, out, 2, seed=0)
    generate(None, out, 4, seed=1, overwrite=True)
    assert len(list(csv.DictReader(open(out / "factors.csv")))) == 4
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DiffexError, match="mine"):
        generate(None, other, 2, seed=0, overwrite=True)
    assert (other / "notes.txt").is_file()
    with pytest.raises(DiffexError, match="n=1"):
        generate(None, tmp_path / "few", 1, seed=0)
    with pytest.raises(DiffexError, match="jpeg"):
        generate(None, tmp_path / "fmt", 2, seed=0, fmt="jpeg")


def test_three_conditions_spec(tmp_path):
    spec = load_spec(packaged_spec_path("three_conditions"))
    assert spec.condition_names == ["control", "drug_a", "drug_b"]
    out = generate(spec, tmp_path / "three", 7, seed=0)
    assert json.loads((out / "dataset.json").read_text())["classes"] == spec.condition_names
    counts = {c: len(list((out / c).glob("*.png"))) for c in spec.condition_names}
    assert counts == {"control": 3, "drug_a": 2, "drug_b": 2}
