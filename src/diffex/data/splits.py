"""Train / validation / test splits: stratified by class, seeded, grouped when groups exist."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from diffex.errors import DiffexError

SPLITS = ("train", "val", "test")


def make_splits(
    labels: list[int],
    groups: list[str | None] | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Return indices per split.

    Without groups every class is split in the given fractions. With groups, whole groups
    are assigned to splits (greedily, largest first, to the split furthest below its target
    count for the group's classes), so no group appears in two splits.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DiffexError(
            f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    if groups is not None and any(g is not None for g in groups):
        return _grouped(
            labels_arr,
            [g if g is not None else f"_row{i}" for i, g in enumerate(groups)],
            fractions,
            rng,
        )
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == cls))
        n = len(idx)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n >= 3:
            n_val = max(n_val, 1) if fractions[1] > 0 else 0
            n_test = max(n_test, 1) if fractions[2] > 0 else 0
        n_train = n - n_val - n_test
        out["train"] += idx[:n_train].tolist()
        out["val"] += idx[n_train : n_train + n_val].tolist()
        out["test"] += idx[n_train + n_val :].tolist()
    return {s: sorted(v) for s, v in out.items()}


def _grouped(
    labels: np.ndarray,
    groups: list[str],
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
) -> dict[str, list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    needed = sum(1 for f in fractions if f > 0)
    if len(names) < needed:
        raise DiffexError(
            f"grouped splits need at least {needed} groups, found {len(names)} ({', '.join(names)})"
        )
    n_cls = int(labels.max()) + 1
    counts = {g: np.bincount(labels[members[g]], minlength=n_cls) for g in names}
    total = sum(counts.values())
    target = np.outer(np.asarray(fractions), total).astype(float)
    have = np.zeros_like(target)
    order = rng.permutation(len(names))
    order = sorted(order, key=lambda i: -counts[names[i]].sum())
    assign: dict[str, int] = {}
    # Seed every split that should be non-empty with one group first.
    for s in [s for s in range(3) if fractions[s] > 0]:
        g = names[order.pop(0)]
        assign[g] = s
        have[s] += counts[g]
    for i in order:
        g = names[i]
        deficit = ((target - have) * counts[g]).sum(axis=1)
        deficit[np.asarray(fractions) == 0] = -np.inf
        s = int(np.argmax(deficit))
        assign[g] = s
        have[s] += counts[g]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for g, s in assign.items():
        out[SPLITS[s]] += members[g]
    return {s: sorted(v) for s, v in out.items()}
