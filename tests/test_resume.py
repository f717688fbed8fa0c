"""Kill-and-resume: every training stage, killed with SIGKILL at 5 random steps, resumes and ends
with exactly the weights of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_blob_folder
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STAGES = {
    "classifier": [
        "train-classifier",
        "--image-size",
        "16",
        "--preset",
        "tiny",
        "--epochs",
        "5",
        "--min-steps",
        "1",
        "--batch-size",
        "8",
        "--patience",
        "0",
    ],
    "autoencoder": [
        "train-autoencoder",
        "--preset",
        "tiny",
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--ddim-steps",
        "2",
        "--sample-every",
        "1000",
    ],
    "directions": ["train-directions", "--k", "2", "--steps", "40", "--batch-size", "2"],
}


def command(stage: str, run: Path, data: Path) -> list[str]:
    args = [sys.executable, "-m", "diffex", *STAGES[stage], "--run", str(run)]
    if stage == "classifier":
        args += ["--data", str(data)]
    return [*args, "--checkpoint-every", "1"]


def checkpoint_step(path: Path) -> int:
    """Step recorded in a training checkpoint (loading it fully, so a broken file fails)."""
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            fh.get_tensor(key)
        return int((fh.metadata() or {})["step"])


def kill_at(cmd: list[str], ckpt: Path, step: int) -> int:
    """Start ``cmd``, SIGKILL it once its checkpoint reaches ``step``; return its exit code."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with safe_open(str(ckpt), framework="pt") as fh:
                reached = int((fh.metadata() or {}).get("step", 0))
        except Exception:  # not written yet (or being replaced)
            reached = 0
        if reached >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return proc.wait()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Data plus a finished classifier, autoencoder and directions (the reference run)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_blob_folder(root / "data", n_per_class=40, size=16)
    run = root / "reference"
    for stage in STAGES:
        subprocess.run(command(stage, run, data), env=ENV, check=True, capture_output=True)
    return data, run


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_resumes_to_identical_weights(
    stage: str, base_run: tuple[Path, Path], tmp_path: Path
) -> None:
    data, reference = base_run
    run = tmp_path / "run"
    order = list(STAGES)
    if stage != "classifier":  # upstream stages copied from the reference run
        run.mkdir()
        shutil.copy(reference / "data.json", run / "data.json")
        for up in order[: order.index(stage)]:
            shutil.copytree(reference / up, run / up)
    ckpt = run / stage / "checkpoint.safetensors"
    total = checkpoint_step(reference / stage / "checkpoint.safetensors")
    rng = random.Random(f"{stage}-kill-points")
    points = sorted(rng.sample(range(1, total - 3), 5))
    cmd = command(stage, run, data)
    for point in points:
        code = kill_at(cmd, ckpt, point)
        assert code == -signal.SIGKILL, f"{stage} was not killed at step {point} (exit {code})"
        assert checkpoint_step(ckpt) >= point  # the file left behind loads and is not behind
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from step" in done.stderr
    assert checkpoint_step(ckpt) == total
    want = load_file(str(reference / stage / "model.safetensors"))
    got = load_file(str(run / stage / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{stage}: {key} differs after resuming"
