"""Disentanglement: how different the directions are from each other."""

from __future__ import annotations

import numpy as np
import torch

from diffex.errors import DiffexError


def abs_cosine_matrix(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """|cos| between every pair of rows of (K, D) vectors (1 on the diagonal; 0 for a zero row)."""
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
    if v.ndim != 2:
        raise DiffexError(f"abs_cosine_matrix expects (K, D) vectors, got shape {tuple(v.shape)}")
    n = v.norm(dim=1, keepdim=True)
    u = torch.where(n > 0, v / n.clamp_min(1e-300), torch.zeros_like(v))
    c = (u @ u.T).abs().clamp(max=1.0)
    c.fill_diagonal_(1.0)
    return c.numpy()


def max_off_diagonal(matrix: np.ndarray, k: int | None = None) -> float:
    """Largest off-diagonal entry among the first ``k`` rows and columns (NaN when k < 2)."""
    m = np.asarray(matrix)[:k, :k] if k is not None else np.asarray(matrix)
    off = m[~np.eye(len(m), dtype=bool)]
    return float(off.max()) if off.size else float("nan")
