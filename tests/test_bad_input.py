"""Bad input: one clear line naming the file or folder, exit code 2, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_CLASSIFIER, make_blob_folder, write_png

from diffex.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def train(data: Path, run: Path) -> list[str]:
    args = ["--device", "cpu", "train-classifier", "--data", str(data), "--run", str(run)]
    return [*args, *FAST_CLASSIFIER]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert_one_line_error(*run_cli(train(missing, tmp_path / "r"), capsys), str(missing))


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*run_cli(train(empty, tmp_path / "r"), capsys), str(empty), "empty")


def test_class_folders_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    assert_one_line_error(*run_cli(train(tmp_path / "d", tmp_path / "r"), capsys), "no images")


def test_only_one_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=4, classes=("only",))
    assert_one_line_error(*run_cli(train(data, tmp_path / "r"), capsys), "only one class")


def test_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    bad = data / "a" / "zz_bad.png"
    bad.write_bytes(b"this is not a png")
    assert_one_line_error(*run_cli(train(data, tmp_path / "r"), capsys), str(bad))


def test_truncated_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6, size=64)
    victim = data / "b" / "b_002.png"
    victim.write_bytes(victim.read_bytes()[:150])
    assert_one_line_error(*run_cli(train(data, tmp_path / "r"), capsys), str(victim))


def test_inconsistent_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    odd = write_png(data / "b" / "b_zzz.png", np.zeros((32, 32), np.uint8))
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, str(odd), "channel")


def test_image_smaller_than_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=6)
    small = write_png(data / "a" / "a_small.png", np.zeros((20, 20, 3), np.uint8))
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, str(small), "smaller than the model size")


def test_manifest_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("file,label\nx.png,a\n")
    assert_one_line_error(*run_cli(train(csv, tmp_path / "r"), capsys), str(csv), "'path'")


def test_manifest_missing_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nmissing.png,a\n")
    assert_one_line_error(*run_cli(train(csv, tmp_path / "r"), capsys), "line 2", "missing.png")


def test_bad_option_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--device", "tpu", "synth", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "tpu" in capsys.readouterr().err
    code = main(["demo", "--until", "bogus", "--out", str(tmp_path / "y")])
    assert code == 2
    assert "'bogus' is not one of 'classifier'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing started


def test_non_image_files_are_skipped_with_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=10)
    (data / "a" / "notes.txt").write_text("lab notes")
    (data / "b" / "Thumbs.db").write_bytes(b"\0\1")
    code, err = run_cli(train(data, tmp_path / "r"), capsys)
    assert code == 0, err
    assert "skipped 2 non-image file(s)" in err
    assert (tmp_path / "r" / "classifier" / "model.safetensors").is_file()


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    exe = shutil.which("diffex", path=str(Path(sys.executable).parent))
    assert exe, "console script not installed"
    proc = subprocess.run(
        [exe, "train-classifier", "--data", str(tmp_path / "absent"), "--run", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "absent") in proc.stderr


def test_variadic_options_and_a_leading_separator() -> None:
    """--conditions takes several values in a row; torchrun's '--' before the arguments is
    dropped."""
    from diffex.cli import expand_variadic, main

    argv = ["prepare", "bbbc021", "--conditions", "DMSO@0.0", "taxol@0.3", "--out", "X"]
    assert expand_variadic(argv) == [
        "prepare",
        "bbbc021",
        "--conditions",
        "DMSO@0.0",
        "--conditions",
        "taxol@0.3",
        "--out",
        "X",
    ]
    assert expand_variadic(["--conditions", "a", "--conditions", "b"]) == [
        "--conditions",
        "a",
        "--conditions",
        "b",
    ]
    assert main(["--", "--version"]) == 0


def test_bad_orientation_in_dataset_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_blob_folder(tmp_path / "blobs", n_per_class=6)
    (data / "dataset.json").write_text('{"orientation": "sideways"}')
    assert main(train(data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "dataset.json" in err and "sideways" in err


def test_output_path_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output folder that cannot be made (a file is in the way) is one line naming it."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "data"
    code, err = run_cli(["synth", "--out", str(out), "--n", "4", "--size", "32"], capsys)
    assert_one_line_error(code, err, str(out), "Not a directory")


def test_bad_attention_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--device", "cpu", "train-autoencoder", "--run", str(tmp_path / "r")]
    code, err = run_cli([*args, "--attention", "16,eight"], capsys)
    assert_one_line_error(code, err, "--attention", "16,eight")


def test_patched_preset_on_an_odd_image_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-autoencoder --preset cpu64p`` on a run whose images are 33 px (2 x 2 patches do
    not tile them) fails with one line naming the patch and the size, before any training."""
    data = make_blob_folder(tmp_path / "blobs", n_per_class=6, size=33)
    run = tmp_path / "run"
    args = ["--device", "cpu", "train-classifier", "--data", str(data), "--run", str(run)]
    fast = [a if a != "32" else "33" for a in FAST_CLASSIFIER]
    assert main([*args, *fast]) == 0
    capsys.readouterr()
    ae = ["--device", "cpu", "train-autoencoder", "--run", str(run), "--preset", "cpu64p"]
    code, err = run_cli([*ae, "--steps", "1"], capsys)
    assert_one_line_error(code, err, "patch", "33")
    assert not (run / "autoencoder" / "model.safetensors").exists()
