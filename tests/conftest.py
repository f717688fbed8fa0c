"""Shared test helpers: small image folders made inside the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: the workers share the cores, one thread each (subprocesses inherit it)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


#: train-classifier options for a quick, tiny classifier (a test's plumbing, not its accuracy).
FAST_CLASSIFIER = ["--image-size", "32", "--preset", "tiny", "--epochs", "1", "--min-steps", "1"]


def blob_image(rng: np.random.Generator, size: int, bright: bool, channels: int = 3) -> np.ndarray:
    """An (H, W, C) uint8 image with a disc whose size depends on the class (easy to classify)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    r = rng.uniform(0.22, 0.32) * size if bright else rng.uniform(0.1, 0.18) * size
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
    img = 0.1 + 0.7 * disc[..., None] * rng.uniform(0.7, 1.0, channels)
    img = img + rng.normal(0, 0.05, (size, size, channels))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> Path:
    """Write (H, W) or (H, W, C) uint8 as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.squeeze() if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path)
    return path


def make_blob_folder(
    root: Path,
    n_per_class: int = 20,
    size: int = 32,
    classes: tuple[str, ...] = ("a", "b"),
    seed: int = 0,
) -> Path:
    """An image folder of two easy classes (small vs large disc)."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        for i in range(n_per_class):
            write_png(root / cls / f"{cls}_{i:03d}.png", blob_image(rng, size, bright=k % 2 == 1))
    return root


#: The longest test files, queued first under ``pytest -n`` (with ``--no-loadscope-reorder``)
#: so that no worker is left with a long tail; test_demo builds the shared quick demo.
HEAVY = ("test_resume", "test_demo", "test_external", "test_real_data", "test_gcd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Queue the heaviest files first (file order is kept otherwise)."""

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return HEAVY.index(stem) if stem in HEAVY else len(HEAVY)

    items.sort(key=rank)


@pytest.fixture
def blob_folder(tmp_path: Path) -> Path:
    return make_blob_folder(tmp_path / "blobs")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick demo, run once per test session (shared by the demo, evaluation and report
    tests). Under ``pytest -n`` the first worker to ask builds it and the others wait for it:
    tests must copy it before changing it."""
    from filelock import FileLock

    from diffex.cli import main

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one per session
    out, done = shared / "demo" / "run", shared / "demo.done"
    with FileLock(str(shared / "demo.lock")):
        if not done.is_file():
            assert main(["--device", "cpu", "demo", "--preset", "quick", "--out", str(out)]) == 0
            done.write_text("ok")
    return out
