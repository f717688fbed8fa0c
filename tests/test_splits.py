"""Splits: stratified, seeded, and grouped splits never share a group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_blob_folder

from diffex.data.loading import DataPlan, load_split, plan_data
from diffex.data.splits import make_splits
from diffex.errors import DiffexError


def test_stratified_fractions_and_seed() -> None:
    labels = [0] * 100 + [1] * 60
    a = make_splits(labels, seed=3)
    assert a == make_splits(labels, seed=3)
    assert a != make_splits(labels, seed=4)
    all_idx = sorted(a["train"] + a["val"] + a["test"])
    assert all_idx == list(range(160))
    lab = np.asarray(labels)
    for split, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        for cls, total in ((0, 100), (1, 60)):
            assert abs((lab[a[split]] == cls).sum() - frac * total) <= 1


@pytest.mark.parametrize("seed", range(5))
def test_grouped_splits_never_leak(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    groups = [f"plate{g}" for g in rng.integers(0, 12, n)]
    labels = rng.integers(0, 3, n).tolist()
    s = make_splits(labels, groups, seed=seed)
    seen = {name: {groups[i] for i in idx} for name, idx in s.items()}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(n))
    assert all(len(v) > 0 for v in s.values())
    assert len(s["train"]) > len(s["val"])


def test_too_few_groups() -> None:
    with pytest.raises(DiffexError, match="at least 3 groups"):
        make_splits([0, 1, 0, 1], ["g1", "g1", "g2", "g2"])


def test_manifest_groups_are_kept_apart(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "imgs", n_per_class=24, size=32)
    rows = ["path,label,plate"]
    for i, p in enumerate(sorted(data.rglob("*.png"))):
        rows.append(f"{p.relative_to(tmp_path)},{p.parent.name},P{i % 8}")
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(rows) + "\n")
    plan, tensors = plan_data(csv, 32, seed=1)
    groups = {s: set(plan.groups[s]) for s in plan.splits}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert plan.classes == ["a", "b"]
    # the saved plan rebuilds exactly the same tensors
    plan.save(tmp_path / "data.json")
    again = load_split(DataPlan.load(tmp_path / "data.json"), "val")
    assert again.paths == tensors["val"].paths
    np.testing.assert_array_equal(again.x.numpy(), tensors["val"].x.numpy())


def test_class_list_sorted_not_listing_order(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=5, classes=("zeta", "Alpha", "mid"))
    plan, _ = plan_data(data, 32)
    assert plan.classes == sorted(["zeta", "Alpha", "mid"])
