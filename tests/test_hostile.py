"""Hostile input through the CLI: one clear line naming the file or value, exit code 2, and
nothing already written is damaged."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_blob_folder
from test_bad_input import assert_one_line_error, run_cli, train

from diffex.data import images


@pytest.fixture(autouse=True)
def _reset_pixel_limit():
    yield
    images.set_pixel_limit(images.DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".jpg", ".jpeg"])
def test_random_bytes_with_image_extension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    bad = data / "a" / f"random{suffix}"
    bad.write_bytes(np.random.default_rng(1).bytes(2048))
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, str(bad))


def test_truncated_tiff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    bad = data / "b" / "cut.tif"
    pixels = np.random.default_rng(0).integers(0, 65535, (3, 64, 64), np.uint16)
    tifffile.imwrite(bad, pixels, photometric="minisblack")
    bad.write_bytes(bad.read_bytes()[:1500])
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, str(bad))


def test_zero_size_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    bad = data / "a" / "empty.png"
    bad.write_bytes(b"")
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, str(bad))


def test_huge_image_refused_by_the_pixel_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    code, err = run_cli(["--max-pixels", "500", *train(data, tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "above the limit of 500")
    # a claimed 100000 x 100000 PNG header is refused before any pixel is decoded
    images.set_pixel_limit(images.DEFAULT_MAX_PIXELS)
    big = tmp_path / "claims_huge.png"
    header = (data / "a" / "a_000.png").read_bytes()
    ihdr = header.index(b"IHDR")
    big.write_bytes(
        header[: ihdr + 4]
        + (100000).to_bytes(4, "big") * 2
        + header[ihdr + 12 :]  # width and height replaced; CRC now wrong too
    )
    with pytest.raises(images.DiffexError) as exc:
        images.read_image(big)
    assert str(big) in str(exc.value) and "above the limit" in str(exc.value)


def test_symlink_loops_in_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    os.symlink(data, data / "a" / "loop")  # a folder loop: not followed
    os.symlink(data / "b" / "self.png", data / "b" / "self.png.tmp")
    os.symlink(data / "b" / "self.png.tmp", data / "b" / "self.png")  # a file loop
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, "self.png")


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the run folder's parent should be")
    code, err = run_cli(train(data, blocker / "run"), capsys)
    assert_one_line_error(code, err, str(blocker / "run"))


def test_full_disk_keeps_earlier_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=10)
    run = tmp_path / "r"
    code, err = run_cli(train(data, run), capsys)
    assert code == 0, err
    before = {
        p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".png"
    }

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("diffex.io.checkpoint.save_file", no_space)
    monkeypatch.setattr("diffex.train.resume.save_file", no_space)
    code, err = run_cli([*train(data, run), "--lr", "0.01"], capsys)
    assert_one_line_error(code, err, "No space left on device")
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was damaged"
    assert not [p for p in run.rglob("*.tmp")], "temporary files left behind"
