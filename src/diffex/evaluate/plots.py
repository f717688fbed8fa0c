"""Evaluation figures: sufficiency curve, COUT insertion curves and disentanglement heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffex.report.plots import plt, save_figure


def sufficiency_curve(rows: list[dict[str, Any]], path: Path) -> Path:
    """Flip rate and mean delta-p when the top-1 .. top-M directions are applied together."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    m = [r["m"] for r in rows]
    ax.plot(m, [r["flip_rate"] for r in rows], "o-", label="flip rate")
    ax.plot(m, [r["mean_delta_p"] for r in rows], "s--", label="mean delta-p")
    ax.set_xlabel("top-M directions applied together")
    ax.set_ylim(-0.05 if min([0] + [r["mean_delta_p"] for r in rows]) >= 0 else -1.05, 1.05)
    ax.set_xticks(m or [1])
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title("sufficiency")
    return save_figure(fig, path)


def cout_curves(curves: dict[str, dict[str, Any]], path: Path, target: str) -> Path:
    """Mean p(target) and p(source) as the edit's pixels are inserted, largest change first."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(c["fraction"], c["p_target"], color=color, label=f"{name} (COUT {c['cout']:+.2f})")
        ax.plot(c["fraction"], c["p_source"], color=color, ls=":")
    ax.set_xlabel("share of changed pixels inserted (largest first)")
    ax.set_ylabel(f"p({target}) solid, p(source) dotted")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    ax.set_title("COUT insertion curves")
    return save_figure(fig, path)


def _heatmap(
    values: np.ndarray,
    rows: list[str],
    cols: list[str],
    path: Path,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str,
) -> Path:
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(v) > 0.6 * max(abs(vmin), abs(vmax)) else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def cos_heatmap(dis: dict[str, Any], path: Path) -> Path:
    """|cos| between the directions' mean shift vectors (standardised latent space)."""
    names = dis["names"]
    return _heatmap(
        np.array(dis["abs_cos"]),
        names,
        names,
        path,
        "|cos| between mean shift vectors",
        0.0,
        1.0,
        "viridis",
    )


def rho_heatmap(dis: dict[str, Any], path: Path) -> Path:
    """Spearman rho between alpha and each measurement, per direction."""
    return _heatmap(
        np.array(dis["rho"], dtype=float),
        dis["names"],
        dis["features"],
        path,
        "Spearman rho of each measurement along alpha",
        -1.0,
        1.0,
        "RdBu_r",
    )
