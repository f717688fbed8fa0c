"""Real data: the bundled handwritten digits through the whole pipeline (the README example),
and natural RGB photos (JPEG, PNG) read and displayed in true colour."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_CLASSIFIER, blob_image
from PIL import Image

from diffex.cli import main
from diffex.data.digits import load_digit_images, prepare_digits, upsample
from diffex.data.display import composite
from diffex.data.images import read_image
from diffex.data.loading import plan_data
from diffex.errors import DiffexError
from diffex.io.atomic import read_json

pytest.importorskip("sklearn")


def test_prepare_digits_writes_upright_upsampled_scans(tmp_path: Path) -> None:
    images, labels = load_digit_images()
    counts = prepare_digits(tmp_path / "d", [3, 8], size=32)
    assert counts == {"3": int((labels == 3).sum()), "8": int((labels == 8).sum())}
    meta = read_json(tmp_path / "d" / "dataset.json")
    assert meta["orientation"] == "upright" and meta["channels"][0]["name"] == "ink"
    first = sorted((tmp_path / "d" / "3").glob("*.png"))[0]
    arr = read_image(first)
    assert arr.shape == (1, 32, 32) and arr.dtype == np.uint8
    index = int(first.stem)
    small = arr[0].reshape(8, 4, 8, 4).mean(axis=(1, 3)) / 255  # back down to 8x8
    assert np.abs(small - images[index]).mean() < 0.08  # the same scan, not another digit
    plan, _ = plan_data(tmp_path / "d", image_size=32)
    assert plan.orientation == "upright" and plan.classes == ["3", "8"]
    assert plan.measure_channels == {}  # no cell roles: the ink is the object


def test_upsample_keeps_a_flat_image_flat() -> None:
    assert np.all(upsample(np.full((8, 8), 0.5), 16) == 128)


@pytest.mark.parametrize(
    ("digits", "message"), [([3], "two or more"), ([3, 3], "two or more"), ([3, 12], "0 and 9")]
)
def test_prepare_digits_rejects_bad_choices(
    tmp_path: Path, digits: list[int], message: str
) -> None:
    with pytest.raises(DiffexError, match=message):
        prepare_digits(tmp_path / "d", digits)


def test_digits_example_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README: diffex prepare digits --out DATA; diffex demo --data DATA --preset quick."""
    data, run = tmp_path / "digits", tmp_path / "run"
    assert main(["prepare", "digits", "--out", str(data), "--digits", "3,8"]) == 0
    assert (
        main(
            ["--device", "cpu", "demo", "--data", str(data), "--preset", "quick", "--out", str(run)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "classifier: accuracy" in out and "report:" in out
    for name in (
        "data.json",
        "classifier/model.safetensors",
        "autoencoder/model.safetensors",
        "directions/model.safetensors",
        "ranking.json",
        "explanations/summary.json",
        "evaluation.json",
        "report.html",
    ):
        assert (run / name).is_file(), name
    assert not (run / "data").exists()  # the user's data is used in place, nothing synthesised
    ranking = read_json(run / "ranking.json")
    assert ranking["target_class"] == "8"
    evaluation = read_json(run / "evaluation.json")
    assert evaluation["ground_truth"] is None  # real data has no known factors
    summary = read_json(run / "explanations" / "summary.json")
    assert summary["items"]  # at least the class-mean reference
    for item in summary["items"]:  # the ink is measured: area, elongation, offsets
        feats = {r["feature"] for r in item["morphology"] if np.isfinite(r["mean_0"])}
        assert {"cell_area", "elongation"} <= feats
    # rerunning skips every stage
    assert (
        main(
            ["--device", "cpu", "demo", "--data", str(data), "--preset", "quick", "--out", str(run)]
        )
        == 0
    )
    assert "time:" not in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_natural_rgb_folders_train_and_display_in_true_colour(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for k, cls in enumerate(("cats", "dogs")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            img = blob_image(rng, 40, bright=k == 1)
            img[..., 0] = img[..., 0] // 2  # a colour cast, so the channels differ
            ext = "jpg" if fmt == "JPEG" else "png"
            Image.fromarray(img).save(root / cls / f"{i}.{ext}", format=fmt)
    run = tmp_path / "run"
    assert (
        main(
            [
                "--device",
                "cpu",
                "train-classifier",
                "--data",
                str(root),
                "--run",
                str(run),
                *FAST_CLASSIFIER,
            ]
        )
        == 0
    )
    plan = read_json(run / "data.json")
    assert plan["channel_colors"] == ["#ff0000", "#00ff00", "#0000ff"]
    assert plan["orientation"] == "any"
    photo = read_image(next((root / "cats").iterdir()))
    shown = composite(photo / 255.0, plan["channel_colors"])
    assert np.abs(shown.astype(int) - photo.transpose(1, 2, 0).astype(int)).max() <= 1


def test_demo_on_user_data_notices_changed_images(tmp_path: Path) -> None:
    """The demo's resume fingerprint of --data changes when images are added or rewritten."""
    from conftest import make_blob_folder

    from diffex.pipeline import _listing

    data = make_blob_folder(tmp_path / "blobs", n_per_class=4)
    first = _listing(data)
    assert _listing(data) == first
    extra = data / "a" / "extra.png"
    Image.new("RGB", (32, 32)).save(extra)
    second = _listing(data)
    assert second != first
    Image.new("RGB", (32, 32), (9, 9, 9)).save(extra)
    os.utime(extra, ns=(1, 1))  # even with an old time stamp, the size or time differs
    assert _listing(data) != second
