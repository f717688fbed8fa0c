"""Image grids: originals and their reconstructions, in false colour, labelled by condition."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from diffex.data.display import composite
from diffex.data.loading import DataPlan
from diffex.report.plots import save_figure


def to_rgb(x: torch.Tensor, plan: DataPlan) -> list[np.ndarray]:
    """Model-space images (N, C, H, W) in [-1, 1] to false-colour RGB uint8 arrays."""
    unit = ((x.float().cpu().numpy() + 1) / 2).clip(0, 1)
    return [composite(img, plan.channel_colors) for img in unit]


def reconstruction_grid(
    originals: torch.Tensor,
    recon: torch.Tensor,
    zonly: torch.Tensor,
    plan: DataPlan,
    path: str | Path,
    title: str = "",
    labels: list[str] | None = None,
) -> Path:
    """Three rows (original, exact reconstruction, semantic-only) by N columns."""
    rows = [("original", originals), ("decode(encode(x))", recon), ("decode(z, noise)", zonly)]
    n = len(originals)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 1.2, 4.4), squeeze=False)
    for r, (name, batch) in enumerate(rows):
        for c, img in enumerate(to_rgb(batch, plan)):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and labels:
                ax.set_title(labels[c], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
