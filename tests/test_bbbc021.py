"""``prepare bbbc021``: BBBC021 layout to single-cell crops, manifest and dataset.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import FAST_CLASSIFIER

from diffex.data.bbbc021 import Bbbc021Config, find_nuclei, parse_condition, prepare_bbbc021
from diffex.data.images import read_image
from diffex.data.sources import open_source
from diffex.errors import DiffexError
from diffex.rundir import RunDir

SIZE = 160
CROP = 48
PLATES = {"Week1_22123": 1.0, "Week2_24121": 3.0, "Week3_25701": 0.5}  # plate -> gain
# (well, compound, concentration) per plate; taxol is never selected.
WELLS = [
    ("B02", "DMSO", 0.0),
    ("B03", "DMSO", 0.0),
    ("C02", "cytochalasin B", 10.0),
    ("C03", "cytochalasin B", 10.0),
    ("D02", "cytochalasin B", 3.0),
    ("E02", "taxol", 0.3),
]
TWO = list(PLATES)[:2]  # the plates of the default fixture
INTERIOR = [(40, 40), (40, 110), (100, 70), (120, 120)]  # (y, x): crops of 48 fit
BORDER = [(8, 80), (150, 30)]  # crops of 48 cross the border
IMAGE_HEADER = [
    "TableNumber",
    "ImageNumber",
    "Image_FileName_DAPI",
    "Image_PathName_DAPI",
    "Image_FileName_Tubulin",
    "Image_PathName_Tubulin",
    "Image_FileName_Actin",
    "Image_PathName_Actin",
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Replicate",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
]
MOA_ROWS = [
    ("DMSO", 0.0, "DMSO"),
    ("cytochalasin B", 10.0, "Actin disruptors"),
    ("cytochalasin B", 3.0, "Actin disruptors"),
    ("taxol", 0.3, "Microtubule stabilizers"),
]


def _nuclei(number: int) -> list[tuple[int, int]]:
    """Known interior nucleus centres of image ``number`` (a small, distinct shift each)."""
    dy, dx = number % 3, (number * 2) % 5
    return [(y + dy, x + dx) for y, x in INTERIOR]


def _planes(number: int, gain: float, rng: np.random.Generator) -> list[np.ndarray]:
    """DAPI, tubulin, actin uint16 planes with Gaussian-disc nuclei and cytoplasm signal."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    dapi = np.full((SIZE, SIZE), 200.0, np.float32)
    cyto = np.zeros((SIZE, SIZE), np.float32)
    for cy, cx in _nuclei(number) + BORDER:
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dapi += 3000.0 * np.exp(-r2 / (2 * 4.0**2))
        cyto += np.exp(-r2 / (2 * 10.0**2))
    tub = 300.0 + 1500.0 * cyto
    act = 250.0 + 1200.0 * cyto * (1 + 0.5 * np.sin(xx / 5.0))
    out = []
    for plane in (dapi, tub, act):
        noisy = gain * plane + rng.normal(0, 15, plane.shape)
        out.append(np.clip(noisy, 0, 65535).astype(np.uint16))
    return out


def make_bbbc021(root: Path, plates: list[str] | None = None) -> tuple[Path, Path, Path]:
    """Images, image table and MOA table in the BBBC021_v1 layout; returns (images, meta, moa)."""
    images = root / "images"
    rng = np.random.default_rng(0)
    rows = []
    number = 0
    for plate in plates or TWO:
        week = plate.split("_")[0]
        for well, compound, conc in WELLS:
            number += 1
            names = []
            for w, plane in zip(
                ("w1", "w2", "w4"), _planes(number, PLATES[plate], rng), strict=True
            ):
                name = f"{week}_150607_{well}_s1_{w}A1B2C3D4-{number:04d}.tif"
                (images / plate).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(images / plate / name, plane, photometric="minisblack")
                names.append(name)
            rows.append(
                [1, number, names[0], plate, names[1], plate, names[2], plate]
                + [plate, well, 1, compound, conc]
            )
    meta = root / "BBBC021_v1_image.csv"
    _write_csv(meta, IMAGE_HEADER, rows)
    moa = root / "BBBC021_v1_moa.csv"
    _write_csv(moa, ["compound", "concentration", "moa"], MOA_ROWS)
    return images, meta, moa


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _cfg(root: Path, data: tuple[Path, Path, Path], conditions: list[str], **kw) -> Bbbc021Config:
    images, meta, moa = data
    kw.setdefault("crop_size", CROP)
    return Bbbc021Config(images, meta, moa, conditions, root / "out", **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_bbbc021(tmp_path_factory.mktemp("bbbc021"))


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path, Path]
) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("prepared")
    summary = prepare_bbbc021(_cfg(root, data, ["DMSO@0.0", "cytochalasin B@10.0"]))
    return root / "out", summary


def test_crops_sit_on_the_known_nuclei(prepared: tuple[Path, dict]) -> None:
    out, summary = prepared
    assert summary["images"] == 8  # 2 plates x (2 DMSO + 2 cytochalasin B @ 10)
    assert summary["crops"] == 8 * len(INTERIOR)
    assert summary["skipped_border"] == 8 * len(BORDER)
    assert summary["per_condition"] == {"DMSO@0.0": 16, "cytochalasin_B@10.0": 16}
    assert summary["per_plate"] == {"Week1_22123": 16, "Week2_24121": 16}
    rows = _read_csv(out / "manifest.csv")
    by_image: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        number = int(Path(r["path"]).stem.split("_")[-2])
        by_image.setdefault(number, []).append((float(r["y"]), float(r["x"])))
    assert len(by_image) == 8
    for number, found in by_image.items():
        known = np.array(_nuclei(number), float)
        dist = np.linalg.norm(np.array(found)[:, None] - known[None], axis=2)
        assert (dist.min(axis=1) <= 2).all()  # every crop is on a known nucleus...
        assert sorted(dist.argmin(axis=1).tolist()) == [0, 1, 2, 3]  # ...each exactly once


def test_crop_files_and_manifest(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    rows = _read_csv(out / "manifest.csv")
    assert list(rows[0]) == [
        "path",
        "label",
        "group",
        "plate",
        "well",
        "compound",
        "concentration",
        "x",
        "y",
    ]
    for r in rows:
        arr = read_image(out / r["path"])
        assert arr.shape == (3, CROP, CROP) and arr.dtype == np.uint16
        assert r["path"].startswith(f"crops/{r['label']}/{r['plate']}_{r['well']}_")
        assert r["group"] == r["plate"]
        centre = arr[0, CROP // 2 - 2 : CROP // 2 + 3, CROP // 2 - 2 : CROP // 2 + 3].mean()
        assert centre > 4 * arr[0, :4, :4].mean()  # the nucleus is in the middle
        expected = {"DMSO@0.0": ("DMSO", "0"), "cytochalasin_B@10.0": ("cytochalasin B", "10")}
        assert (r["compound"], r["concentration"]) == expected[r["label"]]
    assert {r["well"] for r in rows} == {"B02", "B03", "C02", "C03"}
    source = open_source(out / "manifest.csv")
    assert source.channel_names == ["DAPI", "tubulin", "actin"]
    assert source.classes == ["DMSO@0.0", "cytochalasin_B@10.0"]
    assert {r.group for r in source.records} == {"Week1_22123", "Week2_24121"}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "BBBC021" and meta["crop_size"] == CROP
    assert set(meta["normalization"]["plates"]) == {"Week1_22123", "Week2_24121"}


def test_per_plate_normalisation_removes_the_gain(
    prepared: tuple[Path, dict], data: tuple[Path, Path, Path]
) -> None:
    out, _ = prepared
    images = data[0]
    raw = {p: read_image(next((images / p).glob("*_B02_s1_w1*.tif")))[0].max() for p in TWO}
    assert raw["Week2_24121"] / raw["Week1_22123"] > 2.5  # the fixture really differs in gain
    centre: dict[str, list[float]] = {p: [] for p in TWO}
    for r in _read_csv(out / "manifest.csv"):
        arr = read_image(out / r["path"]).astype(float)
        mid = slice(CROP // 2 - 2, CROP // 2 + 3)
        centre[r["plate"]].append(arr[0, mid, mid].mean())
    means = {p: np.mean(v) for p, v in centre.items()}
    assert 0.9 < means["Week2_24121"] / means["Week1_22123"] < 1.1
    bounds = json.loads((out / "dataset.json").read_text())["normalization"]["plates"]
    assert bounds["Week2_24121"]["DAPI"][1] > 2.5 * bounds["Week1_22123"]["DAPI"][1]


def test_moa_and_bare_compound_conditions(tmp_path: Path, data: tuple[Path, Path, Path]) -> None:
    summary = prepare_bbbc021(
        _cfg(tmp_path, data, ["dmso@0", "moa:Actin disruptors"], max_cells_per_image=1)
    )
    assert summary["images_per_condition"] == {"dmso@0": 4, "moa_Actin_disruptors": 6}
    rows = _read_csv(tmp_path / "out" / "manifest.csv")
    actin = {(r["compound"], r["concentration"]) for r in rows if r["label"] != "dmso@0"}
    assert actin == {("cytochalasin B", "10"), ("cytochalasin B", "3")}
    assert summary["crops"] == 10  # one cell per image
    bare = prepare_bbbc021(_cfg(tmp_path, data, ["DMSO", "CYTOCHALASIN b"], max_cells_per_image=1))
    assert bare["images_per_condition"] == {"DMSO": 4, "CYTOCHALASIN_b": 6}
    assert not (tmp_path / "out" / "crops" / "dmso@0").exists()  # old crops were cleared


@pytest.mark.parametrize("key", ["Image_FileName_DAPI", "ImageNumber"])
def test_centres_csv_replaces_segmentation(
    tmp_path: Path, data: tuple[Path, Path, Path], key: str
) -> None:
    meta = _read_csv(data[1])
    centres = tmp_path / "centres.csv"
    rows = [[m[key], 60, 70] for m in meta] + [[m[key], 5, 5] for m in meta]  # (x, y)
    _write_csv(centres, [key, "x", "y"], rows)
    summary = prepare_bbbc021(
        _cfg(tmp_path, data, ["DMSO@0.0", "cytochalasin B@10.0"], centres=centres)
    )
    assert summary["crops"] == 8 and summary["skipped_border"] == 8
    out = _read_csv(tmp_path / "out" / "manifest.csv")
    assert {(r["x"], r["y"]) for r in out} == {("60.0", "70.0")}


def test_touching_nuclei_are_split() -> None:
    yy, xx = np.mgrid[:80, :80]
    disc = lambda cy, cx: ((yy - cy) ** 2 + (xx - cx) ** 2 < 64) * 3000.0  # noqa: E731
    found = find_nuclei(200 + disc(40, 30) + disc(40, 45))
    assert len(found) == 2
    assert np.allclose(sorted(found[:, 1]), [30, 45], atol=1.5)


def test_condition_parsing() -> None:
    c = parse_condition("latrunculin B@1.0")
    assert (c.compound, c.concentration, c.label) == ("latrunculin B", 1.0, "latrunculin_B@1.0")
    assert parse_condition("moa:Actin disruptors").moa == "Actin disruptors"
    assert parse_condition("taxol").concentration is None
    with pytest.raises(DiffexError, match="abc"):
        parse_condition("taxol@abc")


def _drop_column(path: Path, column: str) -> None:
    rows = _read_csv(path)
    header = [h for h in rows[0] if h != column]
    _write_csv(path, header, [[r[h] for h in header] for r in rows])


@pytest.mark.parametrize(
    ("case", "conditions", "needle"),
    [
        ("missing column", ["DMSO@0.0", "taxol@0.3"], "Image_Metadata_Well_DAPI"),
        ("missing moa column", ["DMSO@0.0", "moa:DMSO"], "concentration"),
        ("missing tiff", ["DMSO@0.0", "taxol@0.3"], "E02_s1_w2"),
        ("unknown compound", ["DMSO@0.0", "aspirin@1.0"], "aspirin"),
        ("no rows", ["DMSO@0.0", "taxol@5.0"], "taxol@5.0"),
        ("unknown moa", ["DMSO@0.0", "moa:Kinase inhibitors"], "Kinase inhibitors"),
        ("one condition", ["DMSO@0.0"], "two conditions"),
        ("overlap", ["DMSO", "DMSO@0.0"], "DMSO@0.0"),
    ],
)
def test_bad_input_names_the_culprit(
    tmp_path: Path, case: str, conditions: list[str], needle: str
) -> None:
    images, meta, moa = make_bbbc021(tmp_path, plates=["Week1_22123"])
    if case == "missing column":
        _drop_column(meta, needle)
    elif case == "missing moa column":
        _drop_column(moa, "concentration")
    elif case == "missing tiff":
        next((images / "Week1_22123").glob("*E02_s1_w2*")).unlink()
    with pytest.raises(DiffexError) as err:
        prepare_bbbc021(_cfg(tmp_path, (images, meta, moa), conditions))
    message = str(err.value)
    assert needle in message
    if case == "missing column":
        assert str(meta) in message
    if case == "missing moa column":
        assert str(moa) in message
    if case == "missing tiff":
        assert str(images / "Week1_22123") in message


def test_output_plugs_into_diffex(tmp_path: Path) -> None:
    from diffex.data.loading import plan_data

    data = make_bbbc021(tmp_path, plates=list(PLATES))  # grouped splits need 3+ plates
    prepare_bbbc021(_cfg(tmp_path, data, ["DMSO@0.0", "cytochalasin B@10.0"]))
    plan, tensors = plan_data(tmp_path / "out" / "manifest.csv", image_size=32, seed=0)
    assert plan.channel_names == ["DAPI", "tubulin", "actin"]
    assert tensors["train"].x.shape[1:] == (3, 32, 32)
    plates = {s: set(g) for s, g in plan.groups.items()}
    assert all(plates.values())
    for a in plates:
        for b in plates:
            assert a == b or not plates[a] & plates[b]


def test_cli_prepares_the_published_layout_and_trains_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's commands: PathName as published ("Week1/Week1_22123"), conditions given
    after one --conditions, then a classifier trained on the manifest with plates kept apart."""
    from diffex.cli import main

    images, meta, moa = make_bbbc021(tmp_path, plates=list(PLATES))
    rows = _read_csv(meta)
    for row in rows:
        for ch in ("DAPI", "Tubulin", "Actin"):
            plate = row[f"Image_PathName_{ch}"]
            row[f"Image_PathName_{ch}"] = f"{plate.split('_')[0]}/{plate}"
    _write_csv(meta, IMAGE_HEADER, [[r[c] for c in IMAGE_HEADER] for r in rows])
    out = tmp_path / "data"
    base = ["prepare", "bbbc021", "--images", str(images), "--metadata", str(meta)]
    argv = [*base, "--moa", str(moa), "--out", str(out), "--crop-size", str(CROP)]
    assert main([*argv, "--conditions", "DMSO@0.0", "moa:Actin disruptors"]) == 0
    assert "manifest:" in capsys.readouterr().out
    labels = {r["label"] for r in _read_csv(out / "manifest.csv")}
    assert labels == {"DMSO@0.0", "moa_Actin_disruptors"}
    run = tmp_path / "run"
    train = ["train-classifier", "--data", str(out / "manifest.csv"), "--run", str(run)]
    assert main(["--device", "cpu", *train, *FAST_CLASSIFIER]) == 0
    plan = RunDir(run).load_plan()
    assert plan.channel_names == ["DAPI", "tubulin", "actin"]
    assert len({g for s in plan.groups.values() for g in s}) == 3
    capsys.readouterr()
    assert main([*argv, "--conditions", "DMSO@0.0"]) == 2  # one condition: nothing to compare
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "two conditions" in err and "\n" not in err
