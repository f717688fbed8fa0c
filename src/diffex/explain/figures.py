"""What a biologist sees for one direction: strips, a GIF, curves, difference maps, morphology.

Every function takes already decoded images (the sweep is computed elsewhere) and writes one file
atomically, returning its path. Shapes:

- ``frames``: (A, N, C, H, W) model-space images in [-1, 1] (tensor or array): A values of alpha,
  N cells, with the unedited reconstruction at alpha = 0;
- ``alphas``: (A,), in the order of ``frames`` (usually negative -> 0 -> positive);
- ``probs``: (A, N), p(target) of each frame.

Images are shown on the data's [0, 1] pixel scale (``plan.normalization.to_unit``), so intensities
compare across frames and with the original data; ``stretch=True`` shows the model-space
percentile-stretched images instead ((x + 1) / 2), which helps with dim 16-bit microscopy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffex.data.display import composite
from diffex.data.loading import DataPlan
from diffex.data.measure import CIRCULAR, MEASUREMENTS, measure_batch
from diffex.data.spec import REFERENCE_SIZE
from diffex.errors import DiffexError
from diffex.io.atomic import write_atomic
from diffex.report.plots import save_figure

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _check_sweep(
    frames: Any, alphas: Any, probs: Any | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    f = _np(frames)
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if f.ndim != 5:
        raise DiffexError(f"frames must be (A, N, C, H, W), got shape {f.shape}")
    if len(a) != f.shape[0]:
        raise DiffexError(f"{len(a)} alphas for {f.shape[0]} frames")
    if f.shape[1] == 0 or len(a) == 0:
        raise DiffexError("empty sweep: need at least one alpha and one cell")
    p = None
    if probs is not None:
        p = np.asarray(_np(probs), dtype=np.float64)
        if p.shape != f.shape[:2]:
            raise DiffexError(f"probs must be (A, N) = {f.shape[:2]}, got shape {p.shape}")
    return f, a, p


def display_unit(frames: Any, plan: DataPlan, stretch: bool = False) -> np.ndarray:
    """Model-space images (..., C, H, W) in [-1, 1] -> display images in [0, 1], same shape."""
    f = _np(frames)
    if stretch:
        return np.clip((f + 1.0) / 2.0, 0.0, 1.0)
    flat = f.reshape(-1, *f.shape[-3:])
    return np.clip(plan.normalization.to_unit(flat), 0.0, 1.0).reshape(f.shape)


def _zero_index(alphas: np.ndarray) -> int:
    """Index of alpha = 0 (the unedited reconstruction), or of the alpha closest to 0."""
    return int(np.argmin(np.abs(alphas)))


def _alpha_label(a: float) -> str:
    return "α = 0" if abs(a) < 1e-9 else f"α = {a:+.3g}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # old Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _colors(plan: DataPlan, c: int) -> list[str] | None:
    return list(plan.channel_colors) if len(plan.channel_colors) >= c else None


def _channel_names(plan: DataPlan, c: int) -> list[str]:
    names = list(plan.channel_names)
    return names if len(names) >= c else [f"channel {i}" for i in range(c)]


# --------------------------------------------------------------------------------------------
# image figures
# --------------------------------------------------------------------------------------------


def alpha_strip(
    frames: Any,
    alphas: Any,
    probs: Any,
    plan: DataPlan,
    path: str | Path,
    title: str = "",
    target_name: str = "target",
    stretch: bool = False,
    flags: Sequence[Sequence[str]] | None = None,
    past: Sequence[bool] | None = None,
) -> Path:
    """N rows (cells) x A columns (alphas): false-colour frames with p(target) under each.

    Columns keep the order of ``alphas``; the alpha = 0 column (the unedited reconstruction, or
    the alpha closest to 0) is outlined. ``flags``: the artifact guard's flags per column
    (:func:`diffex.explain.guard.sweep_checks`); flagged columns are outlined in red, marked
    "!" and their flags named under the title. ``past``: per column, whether the edit has left
    the training data (:mod:`diffex.explain.support`); such columns are marked "~" and named.
    """
    f, a, p = _check_sweep(frames, alphas, probs)
    flags = _column_flags(flags, len(a))
    past = _column_past(past, len(a))
    n_a, n = f.shape[:2]
    unit = display_unit(f, plan, stretch)
    colors = _colors(plan, f.shape[2])
    z0 = _zero_index(a)
    fig, axes = plt.subplots(n, n_a, figsize=(1.25 * n_a + 0.9, 1.45 * n + 0.7), squeeze=False)
    for j in range(n_a):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(composite(unit[j, i], colors), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"p = {p[j, i]:.2f}", fontsize=7, labelpad=2)
            if i == 0:
                mark = " !" if flags[j] else ""
                ax.set_title(
                    _alpha_label(a[j]) + mark + (" ~" if past[j] else ""),
                    fontsize=8,
                    color=FLAG_COLOR if mark else "k",
                )
            if j == 0:
                ax.set_ylabel(f"cell {i}", fontsize=8)
            for sp in ax.spines.values():
                if j == z0:
                    sp.set_edgecolor("#ff8c00")
                    sp.set_linewidth(2.5)
                elif flags[j]:
                    sp.set_edgecolor(FLAG_COLOR)
                    sp.set_linewidth(2.0)
                else:
                    sp.set_edgecolor("0.6")
    head = f"{title}\n" if title else ""
    lines = f"{head}p = p({target_name}); outlined: unedited (α = {a[z0]:g})"
    flagged = [f"{_alpha_label(a[j])}: {', '.join(flags[j])}" for j in range(len(a)) if flags[j]]
    if flagged:
        lines += "\n! artifact guard, imaging changed: " + "; ".join(flagged)
    if any(past):
        beyond = ", ".join(_alpha_label(a[j]) for j in range(len(a)) if past[j])
        lines += f"\n~ past the training data (extrapolated, read with care): {beyond}"
    fig.suptitle(lines, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


#: Colour of the frames the artifact guard flags.
FLAG_COLOR = "#d62728"


def _column_past(past: Sequence[bool] | None, n: int) -> list[bool]:
    """One past-the-data mark per alpha (all False when ``past`` is None)."""
    if past is None:
        return [False] * n
    if len(past) != n:
        raise DiffexError(f"{len(past)} past-the-data marks for {n} alphas")
    return [bool(x) for x in past]


def _column_flags(flags: Sequence[Sequence[str]] | None, n: int) -> list[list[str]]:
    """Flags per column (empty lists when none are given)."""
    if flags is None:
        return [[] for _ in range(n)]
    if len(flags) != n:
        raise DiffexError(f"{len(flags)} flag lists for {n} alphas")
    return [list(x) for x in flags]


def _cell_row(
    cells: np.ndarray, colors: list[str] | None, tile: tuple[int, int], gap: int, head: int
) -> Image.Image:
    """Cells (N, C, H, W) in [0, 1] side by side on a dark canvas, ``head`` pixels left on top."""
    tw, th = tile
    n = len(cells)
    canvas = Image.new("RGB", (n * (tw + gap) + gap, th + head + gap), (15, 15, 15))
    for i in range(n):
        rgb = Image.fromarray(composite(cells[i], colors)).resize((tw, th), Image.NEAREST)
        canvas.paste(rgb, (gap + i * (tw + gap), head))
    return canvas


def sweep_frames(
    frames: Any,
    alphas: Any,
    probs: Any,
    plan: DataPlan,
    folder: str | Path,
    max_cells: int = 6,
    tile: int = 128,
    stretch: bool = False,
) -> dict[str, Any]:
    """One PNG per alpha (``folder/frame_XX.png``: up to ``max_cells`` cells side by side) for the
    report's slider; returns ``{"files", "alphas", "p"}`` with p(target) per (alpha, cell)."""
    f, a, p = _check_sweep(frames, alphas, probs)
    n = min(f.shape[1], max(1, int(max_cells)))
    unit = display_unit(f[:, :n], plan, stretch)
    colors = _colors(plan, f.shape[2])
    h, w = f.shape[-2:]
    scale = max(1, int(round(tile / max(h, w))))
    folder = Path(folder)
    files = []
    for j in range(len(a)):
        canvas = _cell_row(unit[j], colors, (w * scale, h * scale), 4, 4)
        path = folder / f"frame_{j:02d}.png"
        write_atomic(path, lambda tmp, c=canvas: c.save(tmp, format="PNG"))
        files.append(path.name)
    return {"files": files, "alphas": a.tolist(), "p": p[:, :n].tolist()}


def sweep_gif(
    frames: Any,
    alphas: Any,
    probs: Any,
    plan: DataPlan,
    path: str | Path,
    fps: float = 4.0,
    max_cells: int = 6,
    tile: int = 128,
    target_name: str = "target",
    stretch: bool = False,
    flags: Sequence[Sequence[str]] | None = None,
    past: Sequence[bool] | None = None,
) -> Path:
    """Animated GIF of the sweep: up to ``max_cells`` cells side by side, one frame per alpha.

    Each frame shows alpha and the mean p(target) over the shown cells, "artifact" on the
    frames ``flags`` (as for :func:`alpha_strip`) flags and "past the data" where ``past`` says
    so; the animation runs from the first alpha to the last and back (ping-pong) and loops
    forever.
    """
    f, a, p = _check_sweep(frames, alphas, probs)
    flags = _column_flags(flags, len(a))
    past = _column_past(past, len(a))
    if not fps > 0:
        raise DiffexError(f"GIF frame rate must be positive, got {fps!r}")
    n = min(f.shape[1], max(1, int(max_cells)))
    unit = display_unit(f[:, :n], plan, stretch)
    colors = _colors(plan, f.shape[2])
    h, w = f.shape[-2:]
    scale = max(1, int(round(tile / max(h, w))))
    th, tw = h * scale, w * scale
    gap, head = 4, 26
    font = _font(14)
    images = []
    for j in range(len(a)):
        canvas = _cell_row(unit[j], colors, (tw, th), gap, head)
        draw = ImageDraw.Draw(canvas)
        label = "alpha = 0" if a[j] == 0 else f"alpha = {a[j]:+g}"  # the bitmap font has no α
        text = f"{label}   mean p({target_name}) = {p[j, :n].mean():.2f}"
        if flags[j]:
            text += "   artifact: " + ", ".join(flags[j])
        if past[j]:
            text += "   past the data"
        color = (255, 110, 110) if flags[j] else (240, 240, 240)
        draw.text((gap + 2, 5), text, fill=color, font=font)
        images.append(canvas)
    order = list(range(len(a))) + list(range(len(a) - 2, 0, -1))
    seq = [images[k] for k in order]
    duration = max(20, int(round(1000.0 / fps)))

    def write(tmp: Path) -> None:
        seq[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=seq[1:],
            duration=duration,
            loop=0,
            disposal=1,
        )

    return write_atomic(path, write)


def probability_curve(
    alphas: Any,
    probs: Any,
    path: str | Path,
    target_name: str,
    title: str = "",
    n_faint: int = 8,
) -> Path:
    """Mean p(target) against alpha, with the interquartile range shaded, mean +- sd dashed,
    and up to ``n_faint`` individual cells as faint lines."""
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    p = np.asarray(_np(probs), dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(a) or p.shape[1] == 0:
        raise DiffexError(f"probs must be (A, N) with A = {len(a)}, got shape {p.shape}")
    order = np.argsort(a, kind="stable")
    a, p = a[order], p[order]
    mean, sd = p.mean(1), p.std(1)
    q1, q3 = np.percentile(p, [25, 75], axis=1)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for i in range(min(n_faint, p.shape[1])):
        ax.plot(a, p[:, i], color="C0", lw=0.7, alpha=0.25)
    ax.fill_between(a, q1, q3, color="C0", alpha=0.25, lw=0, label="interquartile range")
    ax.plot(a, np.clip(mean + sd, 0, 1), color="C0", lw=0.8, ls="--", label="mean ± sd")
    ax.plot(a, np.clip(mean - sd, 0, 1), color="C0", lw=0.8, ls="--")
    ax.plot(a, mean, color="C0", lw=2.0, marker="o", ms=3, label=f"mean of {p.shape[1]} cells")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("α (edit strength)")
    ax.set_ylabel(f"p({target_name})")
    ax.legend(frameon=False, fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def difference_map(
    frames: Any,
    alphas: Any,
    plan: DataPlan,
    path: str | Path,
    title: str = "",
    alpha_index: int | None = None,
    stretch: bool = False,
) -> Path:
    """Where pixels change: mean over cells of (edit - unedited), one panel per channel.

    Top row: the signed mean change on a diverging map (red = more signal, blue = less), same
    scale for every channel. Bottom row: the mean absolute change. The edit is the largest alpha
    unless ``alpha_index`` picks another column; the unedited frame is alpha = 0.
    """
    f, a, _ = _check_sweep(frames, alphas)
    j = int(np.argmax(a)) if alpha_index is None else int(alpha_index)
    if not 0 <= j < len(a):
        raise DiffexError(f"alpha_index {alpha_index} out of range 0..{len(a) - 1}")
    z0 = _zero_index(a)
    unit = display_unit(f[[z0, j]], plan, stretch)
    diff = unit[1] - unit[0]  # (N, C, H, W)
    mean_d = diff.mean(0)
    mean_abs = np.abs(diff).mean(0)
    c = f.shape[2]
    names = _channel_names(plan, c)
    lim = max(float(np.abs(mean_d).max()), 1e-6)
    alim = max(float(mean_abs.max()), 1e-6)
    fig, axes = plt.subplots(
        2, c, figsize=(2.3 * c + 1.4, 5.0), squeeze=False, layout="constrained"
    )
    for ch in range(c):
        im0 = axes[0, ch].imshow(mean_d[ch], cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, ch].set_title(f"{names[ch]}\nmean change", fontsize=8)
        im1 = axes[1, ch].imshow(mean_abs[ch], cmap="magma", vmin=0, vmax=alim)
        axes[1, ch].set_title(f"mean |change| {mean_abs[ch].mean():.3f}", fontsize=8)
        for ax in axes[:, ch]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im0, ax=list(axes[0]), shrink=0.8, label="edit − unedited")
    fig.colorbar(im1, ax=list(axes[1]), shrink=0.8, label="|edit − unedited|")
    head = f"{title}\n" if title else ""
    fig.suptitle(
        f"{head}{_alpha_label(a[j])} vs α = {a[z0]:g}, mean over {f.shape[1]} cells", fontsize=9
    )
    return save_figure(fig, path)


def channel_panels(
    frames: Any,
    alphas: Any,
    plan: DataPlan,
    path: str | Path,
    cell: int = 0,
    title: str = "",
    stretch: bool = False,
) -> Path:
    """One cell, rows = channels (greyscale, one intensity scale per row), columns = the most
    negative alpha, alpha = 0 and the most positive alpha (whichever exist)."""
    f, a, _ = _check_sweep(frames, alphas)
    if not 0 <= cell < f.shape[1]:
        raise DiffexError(f"cell {cell} out of range 0..{f.shape[1] - 1}")
    z0 = _zero_index(a)
    cols = []
    if a.min() < a[z0]:
        cols.append(int(np.argmin(a)))
    cols.append(z0)
    if a.max() > a[z0]:
        cols.append(int(np.argmax(a)))
    unit = display_unit(f[cols, cell], plan, stretch)  # (len(cols), C, H, W)
    c = f.shape[2]
    names = _channel_names(plan, c)
    fig, axes = plt.subplots(c, len(cols), figsize=(1.9 * len(cols) + 0.8, 1.9 * c + 0.5))
    axes = np.asarray(axes).reshape(c, len(cols))
    for ch in range(c):
        hi = max(float(unit[:, ch].max()), 1e-6)
        for jj, col in enumerate(cols):
            ax = axes[ch, jj]
            ax.imshow(unit[jj, ch], cmap="gray", vmin=0.0, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if ch == 0:
                ax.set_title(_alpha_label(a[col]), fontsize=8)
            if jj == 0:
                ax.set_ylabel(names[ch], fontsize=8)
    head = f"{title}\n" if title else ""
    fig.suptitle(f"{head}cell {cell}, channels", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# morphology readout
# --------------------------------------------------------------------------------------------

#: Measurements that can be negative (positions): no % change, only the absolute change.
_SIGNED = ("offset_x", "offset_y")
#: A class gap smaller than this many pooled sds counts as no gap (fraction of gap is NaN).
MIN_GAP_SD = 0.2
#: ... and so does a gap within this many standard errors of 0 (when the class sizes are known).
MIN_GAP_SE = 2.0


def real_gap(source: Mapping[str, float], target: Mapping[str, float]) -> float | None:
    """Target minus source class mean of one measurement (``{mean, sd, n}`` of each class, as
    :func:`feature_stats` gives), or None when the classes do not differ in it: a gap under
    ``MIN_GAP_SD`` pooled sds or, with class sizes known, within ``MIN_GAP_SE`` standard errors
    of 0; without sds, only an exact 0 (or NaN)."""
    mu_s, mu_t = float(source.get("mean", np.nan)), float(target.get("mean", np.nan))
    sd_s, sd_t = float(source.get("sd", np.nan)), float(target.get("sd", np.nan))
    gap = mu_t - mu_s
    if not np.isfinite(gap):
        return None
    pooled = float(np.sqrt(0.5 * (sd_s**2 + sd_t**2)))
    n_s, n_t = float(source.get("n", np.nan)), float(target.get("n", np.nan))
    se = float(np.sqrt(sd_s**2 / n_s + sd_t**2 / n_t)) if n_s > 0 and n_t > 0 else 0.0
    se = se if np.isfinite(se) else 0.0
    if np.isfinite(pooled) and pooled > 0:
        return gap if abs(gap) >= max(MIN_GAP_SD * pooled, MIN_GAP_SE * se) else None
    return gap if abs(gap) > 1e-12 else None


def class_feature_stats(
    class_unit: Mapping[str, Any],
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
    spot_floor: float | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Measure real images of each class once: ``{class: {feature: {mean, sd, n}}}``.

    ``class_unit`` maps class name -> (M, C, H, W) images in [0, 1]. Pass the result to
    :func:`morphology_readout` to reuse it for many directions.
    """
    return {
        name: feature_stats(measure_batch(_np(imgs), channels, reference_size, spot_floor))
        for name, imgs in class_unit.items()
    }


def feature_stats(measured: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{feature: {mean, sd, n}}`` of measurements (``measure_batch``'s output), NaNs left out."""
    out: dict[str, dict[str, float]] = {}
    for k, v in measured.items():
        v = v[np.isfinite(v)]
        out[k] = {
            "mean": float(v.mean()) if v.size else float("nan"),
            "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "n": int(v.size),
        }
    return out


def _class_stats(
    class_unit: Mapping[str, Any],
    channels: Mapping[str, int] | None,
    reference_size: int | None,
    spot_floor: float | None,
) -> dict[str, dict[str, dict[str, float]]]:
    arrays = {k: v for k, v in class_unit.items() if not isinstance(v, Mapping)}
    stats = class_feature_stats(arrays, channels, reference_size, spot_floor) if arrays else {}
    for name, v in class_unit.items():
        if isinstance(v, Mapping):
            stats[name] = {
                feat: dict(s) if isinstance(s, Mapping) else {"mean": float(s)}
                for feat, s in v.items()
            }
    return stats


def _pct(m0: np.ndarray, m1: np.ndarray, ratio_scale: bool) -> np.ndarray:
    if not ratio_scale:
        return np.full_like(m0, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m0 > 1e-12, 100.0 * (m1 - m0) / m0, np.nan)


def morphology_readout(
    unit_0: Any,
    unit_alpha: Any,
    class_unit: Mapping[str, Any],
    source: str,
    target: str,
    n_boot: int = 1000,
    seed: int = 0,
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
    spot_floor: float | None = None,
) -> list[dict[str, Any]]:
    """How classical measurements change along a direction, one row per measurement.

    ``unit_0`` and ``unit_alpha``: the same N cells, unedited and edited, (N, C, H, W) in [0, 1].
    ``class_unit``: class name -> real images (M, C, H, W) in [0, 1], or precomputed statistics
    (:func:`class_feature_stats`, or class -> {feature: mean}); ``source`` and ``target`` name
    the classes whose gap the change is compared with.

    Each row: ``feature``, ``n`` (cells measurable in both), ``mean_0``, ``mean_alpha``,
    ``change`` (mean paired difference) with its bootstrap 95 % CI, ``pct_change``
    (100 * change / mean_0) with its CI, ``source_mean``, ``target_mean``, ``class_gap``
    (target - source), ``fraction_of_gap`` (change / gap) with its CI, and ``change_sd``
    (change / pooled real sd, when the sds are known). The CIs resample cells with replacement,
    keeping pairs. The fraction of gap is NaN when there is no real gap to compare with (a
    nuisance measurement): when the gap is below ``MIN_GAP_SD`` (0.2) pooled sds or, with class
    sizes known, within ``MIN_GAP_SE`` (2) standard errors of 0; without sds, only a gap of
    exactly 0 counts as none. % change is
    NaN for signed measurements (offsets) and when mean_0 <= 0. Circular measurements
    (``rotation``, axial and undefined for round cells) are skipped. Rows keep the order of
    :data:`diffex.data.measure.MEASUREMENTS`. ``spot_floor`` (see
    :func:`diffex.data.measure.measure_image`) applies to every image measured here; pass
    :func:`diffex.data.measure.spot_noise_floor` of real images when the frames are generated.
    """
    u0, u1 = _np(unit_0), _np(unit_alpha)
    if u0.ndim != 4 or u0.shape != u1.shape or len(u0) == 0:
        raise DiffexError(
            f"morphology_readout: unit_0 and unit_alpha must be the same non-empty (N, C, H, W), "
            f"got {u0.shape} and {u1.shape}"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise DiffexError(f"n_boot must be a positive integer, got {n_boot!r}")
    for name in (source, target):
        if name not in class_unit:
            raise DiffexError(f"morphology_readout: no real images or statistics for {name!r}")
    stats = _class_stats(class_unit, channels, reference_size, spot_floor)
    m0 = measure_batch(u0, channels, reference_size, spot_floor)
    m1 = measure_batch(u1, channels, reference_size, spot_floor)
    rng = np.random.default_rng(seed)
    rows = []
    for feat in MEASUREMENTS:
        if feat in CIRCULAR:
            continue
        ok = np.isfinite(m0[feat]) & np.isfinite(m1[feat])
        v0, v1 = m0[feat][ok], m1[feat][ok]
        n = int(ok.sum())
        s_src = stats[source].get(feat, {})
        s_tgt = stats[target].get(feat, {})
        mu_s, mu_t = float(s_src.get("mean", np.nan)), float(s_tgt.get("mean", np.nan))
        sd_s, sd_t = float(s_src.get("sd", np.nan)), float(s_tgt.get("sd", np.nan))
        pooled = float(np.sqrt(0.5 * (sd_s**2 + sd_t**2)))
        gap = mu_t - mu_s
        has_gap = real_gap(s_src, s_tgt) is not None
        row: dict[str, Any] = {"feature": feat, "n": n}
        if n == 0:
            row.update(dict.fromkeys(_ROW_KEYS, float("nan")))
            row.update(source_mean=mu_s, target_mean=mu_t, class_gap=gap)
            rows.append(row)
            continue
        idx = rng.integers(0, n, size=(n_boot, n))
        b0, b1 = v0[idx].mean(1), v1[idx].mean(1)
        mean0, mean1 = float(v0.mean()), float(v1.mean())
        ratio = feat not in _SIGNED and bool(np.all(v0 >= 0))
        change = mean1 - mean0
        bchange = b1 - b0
        pct = float(_pct(np.array([mean0]), np.array([mean1]), ratio)[0])
        bpct = _pct(b0, b1, ratio)
        lo_c, hi_c = np.percentile(bchange, [2.5, 97.5])
        lo_p, hi_p = (
            np.nanpercentile(bpct, [2.5, 97.5]) if np.isfinite(bpct).any() else (np.nan, np.nan)
        )
        if has_gap:
            frac, lo_f, hi_f = change / gap, *sorted((lo_c / gap, hi_c / gap))
        else:
            frac = lo_f = hi_f = float("nan")
        row.update(
            mean_0=mean0,
            mean_alpha=mean1,
            change=change,
            change_ci_low=float(lo_c),
            change_ci_high=float(hi_c),
            pct_change=pct,
            pct_ci_low=float(lo_p),
            pct_ci_high=float(hi_p),
            source_mean=mu_s,
            target_mean=mu_t,
            class_gap=gap,
            fraction_of_gap=float(frac),
            fraction_ci_low=float(lo_f),
            fraction_ci_high=float(hi_f),
            change_sd=change / pooled if np.isfinite(pooled) and pooled > 0 else float("nan"),
        )
        rows.append(row)
    return rows


_ROW_KEYS = (
    "mean_0",
    "mean_alpha",
    "change",
    "change_ci_low",
    "change_ci_high",
    "pct_change",
    "pct_ci_low",
    "pct_ci_high",
    "fraction_of_gap",
    "fraction_ci_low",
    "fraction_ci_high",
    "change_sd",
)


def _sort_key(row: Mapping[str, Any]) -> tuple[int, float]:
    f = row.get("fraction_of_gap", float("nan"))
    if f is not None and np.isfinite(f):
        return (0, -abs(float(f)))
    sd = row.get("change_sd", float("nan"))
    return (1, -abs(float(sd)) if sd is not None and np.isfinite(sd) else 0.0)


def _finite(row: Mapping[str, Any], key: str) -> bool:
    v = row.get(key)
    return v is not None and bool(np.isfinite(v))


def _fmt_change(row: Mapping[str, Any]) -> str:
    if _finite(row, "pct_change"):
        text = f"{row['pct_change']:+.0f} % [{row['pct_ci_low']:+.0f}, {row['pct_ci_high']:+.0f}]"
    elif _finite(row, "change"):
        text = f"{row['change']:+.2g} [{row['change_ci_low']:+.2g}, {row['change_ci_high']:+.2g}]"
    else:
        return "not measurable"
    if _finite(row, "change_sd"):
        text += f"; {row['change_sd']:+.1f} sd"
    return text


def morphology_table_png(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Bar chart of the readout: change as a fraction of the class gap with its 95 % CI, largest
    |fraction| first; measurements without a class gap are listed below in grey (largest change
    in real-cell sds first); beside each bar: the % change (or the absolute change for signed
    measurements) with its CI, and the change in sds of real cells."""
    if not rows:
        raise DiffexError("morphology_table_png: no rows to draw")
    rs = sorted(rows, key=_sort_key)
    n = len(rs)
    fig, ax = plt.subplots(figsize=(7.2, 0.36 * n + 1.3))
    y = np.arange(n)[::-1]
    fr = np.array([float(r.get("fraction_of_gap", np.nan)) for r in rs])
    lo = np.array([float(r.get("fraction_ci_low", np.nan)) for r in rs])
    hi = np.array([float(r.get("fraction_ci_high", np.nan)) for r in rs])
    has = np.isfinite(fr)
    colors = np.where(fr >= 0, "#d6604d", "#4393c3")
    ax.barh(y[has], fr[has], color=colors[has], height=0.6)
    ok = has & np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(
        fr[ok],
        y[ok],
        xerr=np.vstack([fr[ok] - lo[ok], hi[ok] - fr[ok]]),
        fmt="none",
        ecolor="0.2",
        capsize=2,
        lw=0.8,
    )
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
    lim = max(1.2, float(np.nanmax(np.abs(np.r_[fr[has], lo[ok], hi[ok], 0.0]))) * 1.1)
    ax.set_xlim(-lim, lim)
    ax.set_yticks(y, [r["feature"] for r in rs], fontsize=8)
    for label, yi, r, h in zip(ax.get_yticklabels(), y, rs, has, strict=True):
        label.set_color("black" if h else "0.55")
        ax.text(
            1.02,
            yi,
            _fmt_change(r),
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=7,
            color="black" if h else "0.55",
        )
    ax.set_xlabel("change as a fraction of the class gap (target − source; dotted: full gap)")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
