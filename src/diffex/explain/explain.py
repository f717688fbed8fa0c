"""Explanation stage: for each ranked direction, a sweep over alpha rendered as strips, a GIF,
the probability curve, a difference map, per-channel panels and the morphology readout."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from diffex.config import INVERSION_REFINE
from diffex.data.loading import DataPlan, SplitData, load_split
from diffex.data.measure import CIRCULAR, MEASUREMENTS, measure_batch
from diffex.errors import DiffexError
from diffex.explain.figures import (
    alpha_strip,
    channel_panels,
    difference_map,
    morphology_readout,
    morphology_table_png,
    probability_curve,
    sweep_frames,
    sweep_gif,
)
from diffex.explain.guard import flagged_frames, imaging_drift, reference_spread, sweep_checks
from diffex.explain.latents import encode_cached
from diffex.explain.legibility import real_class_stats
from diffex.explain.methods import load_direction_set
from diffex.explain.rank import RankConfig, heldout_split, prober, source_images
from diffex.explain.support import PAST_SHARE, axis_range, past_data_share, past_frames
from diffex.io.atomic import write_json
from diffex.log import info, track, warn
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.models.directions import LatentSpace
from diffex.rundir import RunDir
from diffex.runtime import check_gain_margin, check_inversion_refine, check_precision
from diffex.train.autoencoder import bound_gains, load_autoencoder, semantic_latents


@dataclass
class ExplainConfig:
    """Settings of the explanation stage.

    ``precision``: auto, fp32 or bf16 DDIM decodes (the UNet under bf16 autocast; ``auto``:
    where the hardware has native bf16); the classifier, measurements and statistics stay fp32.
    ``gain_margin``: bound the UNet's z gains to their range over the training images, widened
    by this share of it (None: unbounded; BENCHMARKS: "Gains bounded to the data").
    ``inversion_refine``: fixed-point refinement of the DDIM inversion (0: plain; BENCHMARKS:
    "Exact inversion").
    ``n_cells``: cells edited per direction, for the curves and the morphology readout; 64, as
    many as the ranking scores, because on 24 cells the readout's 95 % interval on a class-gap
    fraction was about +-0.16 gaps wide (BENCHMARKS: "The readout on 64 cells, and OpenMP's
    wait policy").
    ``ddim_steps``: None decodes with the ranking's steps (``ranking.json``; 10 in every demo
    preset), so the readout measures the edit the ranking chose (the strips look the same at 10
    steps as at 20)."""

    n_cells: int = 64
    n_strip: int = 6
    n_alphas: int = 7
    ddim_steps: int | None = None
    batch_size: int = 128
    reference: bool = True
    measure: bool = True
    seed: int = 0
    precision: str = "auto"
    gain_margin: float | None = None
    inversion_refine: int = INVERSION_REFINE

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_gain_margin(self.gain_margin)
        check_inversion_refine(self.inversion_refine)
        if self.n_alphas < 3 or self.n_alphas % 2 == 0:
            raise DiffexError(f"n_alphas must be odd and >= 3 (it includes 0), got {self.n_alphas}")
        if self.n_cells < 2:
            raise DiffexError(f"n_cells must be >= 2, got {self.n_cells}")
        if self.ddim_steps is not None and self.ddim_steps < 1:
            raise DiffexError(f"ddim_steps must be >= 1, got {self.ddim_steps}")


def sweep(
    ae: DiffusionAutoencoder,
    space: LatentSpace,
    z: torch.Tensor,
    x_T: torch.Tensor,
    unit_fn: Any,
    alphas: np.ndarray,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """Decode every cell at every alpha along ``unit_fn(zs)`` (unit vectors in standardised z).

    Returns frames (A, N, C, H, W) in [-1, 1], on ``z``'s device; all alphas of all cells in
    batched calls. The edits are computed on the space's device (the GPU, when there is one).
    """
    moved = edited_latents(space, z, unit_fn, alphas)
    return decode_sweep(ae, moved, x_T, len(alphas), steps, batch_size)


def decode_sweep(
    ae: DiffusionAutoencoder,
    moved: torch.Tensor,
    x_T: torch.Tensor,
    n_alphas: int,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """Frames (A, N, C, H, W) of edited latents ``moved`` (A * N, D; :func:`edited_latents`),
    each decoded from its cell's ``x_T`` (N, C, H, W)."""
    frames = ae.decode(moved, x_T.repeat(n_alphas, 1, 1, 1), steps=steps, batch_size=batch_size)
    return frames.reshape(n_alphas, len(x_T), *frames.shape[1:])


def edited_latents(
    space: LatentSpace, z: torch.Tensor, unit_fn: Any, alphas: np.ndarray
) -> torch.Tensor:
    """Raw z_sem of every cell at every alpha along ``unit_fn(zs)``: (A * N, D), alpha-major."""
    with torch.no_grad():
        units = unit_fn(space.standardise(z)).repeat(len(alphas), 1)
        per_latent = torch.as_tensor(np.repeat(np.asarray(alphas, dtype=np.float32), len(z)))
        return space.shift(z.repeat(len(alphas), 1), units, per_latent)


def factor_trends(
    unit_frames: np.ndarray,
    alphas: np.ndarray,
    channels: Mapping[str, int] | None = None,
    spot_floor: float | None = None,
) -> dict[str, dict[str, float]]:
    """Spearman rho between alpha and each measurement over all (cell, alpha) pairs of the
    sweep (``rho``), and over its half towards the target, alpha >= 0 (``rho_forward``: what
    the edit from the unedited cell to the counterfactual does, without the extrapolation
    away from the target). ``spot_floor``: see :func:`diffex.data.measure.measure_image`."""
    a, n = unit_frames.shape[:2]
    flat = unit_frames.reshape(a * n, *unit_frames.shape[2:])
    values = measure_batch(flat, channels, spot_floor=spot_floor)
    alpha_rep = np.repeat(alphas, n)
    forward = alpha_rep >= 0
    return {
        feat: {
            "rho": spearman(alpha_rep, values[feat]),
            "rho_forward": spearman(alpha_rep[forward], values[feat][forward]),
        }
        for feat in MEASUREMENTS
        if feat not in CIRCULAR
    }


def spearman(a: np.ndarray, v: np.ndarray) -> float:
    """Spearman rho over the finite values; NaN with fewer than 3 or when either is constant."""
    ok = np.isfinite(v)
    if ok.sum() < 3 or np.ptp(v[ok]) == 0 or np.ptp(a[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], v[ok]).statistic)


def explain_run(
    run: str | Path,
    cfg: ExplainConfig,
    device: torch.device,
    method: str = "diffex",
    unranked: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Render every ranked direction of ``method`` (DiffEx's, with the class-mean reference, or
    a baseline's) into its ``explanations/`` folder; ``unranked`` (direction, sign) pairs of
    DiffEx's that the ranking did not rank too, listed apart under ``"unranked"`` of the
    summary so that nothing downstream takes them for ranked explanations."""
    rd = RunDir(run)
    plan = rd.load_plan()
    dset = load_direction_set(run, method, device, reference=cfg.reference, unranked=unranked)
    ae = load_autoencoder(
        run, device, precision=cfg.precision, inversion_refine=cfg.inversion_refine
    )
    # The training latents bound the data for the past-the-data marks and, with a margin, the
    # z gains: encoded once for both.
    z_train = semantic_latents(ae, load_split(plan, "train").x)
    if cfg.gain_margin is not None:
        bound_gains(ae, z_train, cfg.gain_margin)
    target = dset.target
    target_name = dset.ranking["target_class"]
    held = load_split(plan, heldout_split(plan))  # read once: source cells and guard cells
    x, keys = source_images(plan, target, cfg.n_cells, cfg.seed + 1, data=held)
    steps = cfg.ddim_steps or int(dset.ranking.get("ddim_steps", RankConfig.ddim_steps))
    info(f"explain: encoding {len(x)} cells")
    z, x_T = encode_cached(ae, run, x, keys, steps, cfg.batch_size)
    probs = prober(ae)
    out = dset.folder / "explanations"
    class_stats, spot_floor = real_class_stats(plan) if cfg.measure else (None, None)
    gain_channel = plan.measure_channels.get("nucleus")
    spread = _guard_spread(plan, held, gain_channel, cfg.seed)
    bounds = axis_range(dset.space, z_train, target)
    source_name = _source_name(plan, target)
    items = dset.all_items()
    summary: dict[str, Any] = {
        "method": method,
        "target_class": target_name,
        "alphas": (float(dset.ranking["alpha"]) * np.linspace(-1, 1, cfg.n_alphas)).tolist(),
        "n_cells": len(x),
        "ddim_steps": steps,
        "precision": ae.decode_precision,
        "inversion": ae.inversion,
        "spot_floor": spot_floor,
        "items": [],
        "unranked": [],
    }
    for item in track(items, "explain", total=len(items)):
        name, label = item.name, item.label
        alphas = np.linspace(-item.alpha, item.alpha, cfg.n_alphas)
        moved = edited_latents(dset.space, z, item.units, alphas)
        frames = decode_sweep(ae, moved, x_T, len(alphas), steps, cfg.batch_size)
        per_alpha = moved.reshape(len(alphas), len(z), -1)
        past = [past_data_share(dset.space, m, target, bounds) for m in per_alpha]
        beyond = [share >= PAST_SHARE for share in past]
        p = probs(frames.reshape(-1, *frames.shape[2:]))[:, target].reshape(len(alphas), -1)
        p_np = p.numpy()
        folder = out / name
        title = f"{label}: towards {target_name}"
        unit = plan.normalization.to_unit(frames)
        checks = sweep_checks(unit, alphas, spread, gain_channel)
        for check, share in zip(checks, past, strict=True):
            check["past_data"] = share
        flags = [c["flags"] for c in checks]
        strip = frames[:, : cfg.n_strip]
        alpha_strip(
            strip,
            alphas,
            p_np[:, : cfg.n_strip],
            plan,
            folder / "strip.png",
            title,
            target_name=target_name,
            flags=flags,
            past=beyond,
        )
        sweep_gif(
            strip,
            alphas,
            p_np[:, : cfg.n_strip],
            plan,
            folder / "sweep.gif",
            target_name=target_name,
            flags=flags,
            past=beyond,
        )
        frame_info = sweep_frames(strip, alphas, p_np[:, : cfg.n_strip], plan, folder / "frames")
        probability_curve(alphas, p_np, folder / "probability.png", target_name, title=title)
        difference_map(frames, alphas, plan, folder / "difference.png", title=title)
        channel_panels(frames, alphas, plan, folder / "channels.png", title=title)
        entry: dict[str, Any] = {
            "name": name,
            "label": label,
            "folder": str(folder.relative_to(rd.root)),
            "alphas": alphas.tolist(),
            "mean_p_target": p_np.mean(axis=1).tolist(),
            "frames": {**frame_info, "folder": "frames"},
            "frame_checks": checks,
            "past_data": past,
        }
        if any(flags):
            named = "; ".join(flagged_frames(checks))
            warn(f"explain: {name}: the artifact guard flags frames of the sweep ({named})")
        if cfg.measure and class_stats is not None:
            zero = len(alphas) // 2
            rows = morphology_readout(
                unit[zero],
                unit[-1],
                class_stats,
                source_name,
                target_name,
                seed=cfg.seed,
                channels=plan.measure_channels,
                spot_floor=spot_floor,
            )
            trends = factor_trends(unit, alphas, plan.measure_channels, spot_floor)
            for row in rows:
                trend = trends.get(row["feature"], {})
                row["rho_alpha"] = trend.get("rho", float("nan"))
                row["rho_forward"] = trend.get("rho_forward", float("nan"))
            morphology_table_png(rows, folder / "morphology.png", title=title)
            entry["morphology"] = rows
            entry["imaging_drift"] = imaging_drift(rows)
            if entry["imaging_drift"]:
                drifts = "; ".join(entry["imaging_drift"])
                past_named = "; ".join(past_frames(checks))
                where = f"; frames past the training data: {past_named}" if past_named else ""
                warn(f"explain: {name}: imaging measurements follow alpha ({drifts}){where}")
        summary["items" if item.ranked else "unranked"].append(entry)
        write_json(folder / "summary.json", entry)
    write_json(out / "summary.json", summary)
    stale = prune_stale(out, {item.name for item in items})
    if stale:
        info(f"explain: removed earlier explanations {', '.join(stale)}")
    info(f"explain: wrote {len(items)} explanations to {out}")
    return summary


def prune_stale(out: Path, keep: set[str]) -> list[str]:
    """Remove the explanation folders under ``out`` (those holding a ``summary.json``) that are
    not in ``keep``, so an earlier ranking's directions are not shown beside the current ones;
    returns their names. Other files and folders are left alone."""
    stale = sorted(
        d.name
        for d in out.iterdir()
        if d.is_dir() and d.name not in keep and (d / "summary.json").is_file()
    )
    for name in stale:
        shutil.rmtree(out / name)
    return stale


#: Real held-out cells (every class) whose spread scales the frame guard's changes.
GUARD_CELLS = 256


def _guard_spread(
    plan: DataPlan, data: SplitData, gain_channel: int | None, seed: int
) -> dict[str, float]:
    """The artifact guard's natural spread (:func:`diffex.explain.guard.reference_spread`) over
    up to ``GUARD_CELLS`` seeded cells of every class of the held-out split ``data``."""
    idx = np.sort(np.random.default_rng(seed + 3).permutation(len(data.y))[:GUARD_CELLS])
    return reference_spread(plan.normalization.to_unit(data.x[idx]), gain_channel)


def _source_name(plan: DataPlan, target: int) -> str:
    """The class the target is compared with (the other class, or the first non-target one)."""
    return next(c for i, c in enumerate(plan.classes) if i != target)
