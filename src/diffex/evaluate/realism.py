"""Realism of edited images: Frechet distance (FID) and kernel inception distance (KID) between
feature sets, computed on any offline feature space."""

from __future__ import annotations

import numpy as np

from diffex.errors import DiffexError


def _check(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DiffexError(
            f"{what}: expected (N, D) feature sets with the same D, got {a.shape}, {b.shape}"
        )
    if len(a) < 2 or len(b) < 2:
        raise DiffexError(
            f"{what}: each feature set needs at least 2 rows, got {len(a)} and {len(b)}"
        )
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2).

    Exact for any sample sizes: with S_a = A A^T and S_b = B B^T (centred rows scaled by
    1 / sqrt(n - 1)), the last trace is the sum of the singular values of A^T B, which avoids a
    matrix square root of singular D x D covariances when N < D.
    """
    a, b = _check(a, b, "frechet_distance")
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    d = ((a.mean(0) - b.mean(0)) ** 2).sum() + (ca**2).sum() + (cb**2).sum() - 2 * cross
    return float(max(d, 0.0))


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(u, v) = (u.v / D + 1)^3."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def kid(
    a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0
) -> dict[str, float]:
    """Kernel inception distance: mean and sd of the unbiased polynomial-kernel MMD^2 over random
    subsets of ``min(subset_size, len(a), len(b))`` rows of each set (seeded). Unbiased: about 0
    for two samples of one distribution, and it may be slightly negative."""
    a, b = _check(a, b, "kid")
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = [
        _poly_mmd2(
            a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals))}
