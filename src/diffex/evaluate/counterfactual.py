"""Counterfactual metrics of edited images: effect on the classifier, proximity, COUT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import trapezoid

from diffex.errors import DiffexError

ProbFn = Callable[[torch.Tensor], torch.Tensor]


def effect(p_recon: np.ndarray, p_edit: np.ndarray, target: int) -> dict[str, float | np.ndarray]:
    """Mean delta-p of the target class and flip rate (share of images not predicted as the
    target before the edit and predicted as the target after it, over all images).

    ``p_recon`` and ``p_edit``: (N, K) probabilities of the same N images.
    """
    if p_recon.shape != p_edit.shape or p_recon.ndim != 2:
        raise DiffexError(
            f"effect: shapes differ or are not (N, K): {p_recon.shape}, {p_edit.shape}"
        )
    delta = p_edit[:, target] - p_recon[:, target]
    flipped = (p_edit.argmax(1) == target) & (p_recon.argmax(1) != target)
    return {"mean_delta_p": float(delta.mean()), "flip_rate": float(flipped.mean())}


def proximity(x0_unit: np.ndarray, x1_unit: np.ndarray) -> dict[str, float]:
    """Mean per-pixel L1 and root-mean-square (L2) change between image batches on the [0, 1]
    display scale, averaged over images."""
    d = np.asarray(x1_unit, dtype=np.float64) - np.asarray(x0_unit, dtype=np.float64)
    d = d.reshape(len(d), -1)
    return {"l1": float(np.abs(d).mean()), "l2": float(np.sqrt((d**2).mean(1)).mean())}


@torch.no_grad()
def cout(
    probs: ProbFn,
    x0: torch.Tensor,
    x1: torch.Tensor,
    source: np.ndarray,
    target: int,
    steps: int = 50,
) -> dict[str, object]:
    """COUT (Khorram and Fuxin 2022): insert the edit's changed pixels into the unedited image in
    order of the size of their change (summed over channels), in ``steps`` equal portions, and
    compare the area under p(target) with the area under p(source) along the way.

    ``x0`` (unedited) and ``x1`` (edited): (N, C, H, W); ``source``: each image's source class.
    Areas use the trapezoid rule over the inserted fraction in [0, 1], so per image
    COUT = area(p_target) - area(p_source) lies in [-1, 1]. Returns the mean, the per-image
    values and the mean curves of p(target) and p(source).
    """
    if x0.shape != x1.shape or x0.ndim != 4:
        raise DiffexError(
            f"cout: x0 and x1 must be the same (N, C, H, W), got {x0.shape}, {x1.shape}"
        )
    if steps < 1:
        raise DiffexError(f"cout: steps must be >= 1, got {steps}")
    n, c, h, w = x0.shape
    mag = (x1 - x0).abs().sum(1).reshape(n, -1)
    order = torch.argsort(mag, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())
    rank = rank.reshape(n, 1, h, w)
    src = torch.as_tensor(np.asarray(source), dtype=torch.long)
    pt, ps = np.zeros((steps + 1, n)), np.zeros((steps + 1, n))
    for t in range(steps + 1):
        k = int(np.ceil(t / steps * h * w))
        xt = torch.where(rank < k, x1, x0)
        p = probs(xt).float().cpu()
        pt[t] = p[:, target].numpy()
        ps[t] = p[torch.arange(n), src].numpy()
    grid = np.linspace(0.0, 1.0, steps + 1)
    per_image = trapezoid(pt - ps, grid, axis=0)
    return {
        "cout": float(per_image.mean()),
        "per_image": per_image,
        "fraction": grid,
        "p_target": pt.mean(1),
        "p_source": ps.mean(1),
    }
