"""Which factors the classifier itself responds to, measured with the synthetic generator.

On the synthetic benchmark the generator can draw the same cell twice, once as it is and once
with one factor moved (same random generator state, so the same fibre layout, puncta and noise
up to what the moved factor consumes). The classifier's change of p(target) between the two is
its true response to that factor, without any autoencoder in between. This tells the ground-truth
scores what an explanation could find at best: a causal factor the classifier ignores cannot be
recovered by any faithful explainer, and a nuisance factor it responds to is a shortcut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffex.data.spec import KNOWN_FACTORS, SynthSpec
from diffex.data.synth import render_cell, sample_factors
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import ProbFn, effect

#: Nuisance factors are moved by this many of their sds (they have no class gap to move by).
NUISANCE_SHIFT_SD = 1.0
ALL_CAUSAL = "all causal"

ToModel = Callable[[np.ndarray], np.ndarray]


def _render(
    factors: dict[str, float], size: int, seed: int, index: int, roles: Sequence[str]
) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
    return render_cell(factors, size, rng, roles)


def _moved(spec: SynthSpec, factors: dict[str, float], moves: dict[str, float]) -> dict[str, float]:
    """``factors`` with each factor in ``moves`` moved by that amount (its units), then clipped
    to the spec's range (rounded for integer factors), as the generator does."""
    out = dict(factors)
    for name, delta in moves.items():
        f = spec.factors[name]
        v = float(np.clip(out[name] + delta, f.min, f.max))
        out[name] = float(np.round(v)) if KNOWN_FACTORS[name].integer else v
    return out


def _bootstrap_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float]:
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    lo, hi = np.percentile(values[idx].mean(1), [2.5, 97.5])
    return [float(lo), float(hi)]


def classifier_sensitivity(
    probs: ProbFn,
    to_model: ToModel,
    spec: SynthSpec,
    source: str,
    target: str,
    target_index: int,
    size: int,
    n_cells: int = 64,
    seed: int = 0,
    quantize: bool = True,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """The classifier's response to each factor of ``spec``, one factor moved at a time.

    ``n_cells`` cells are drawn from ``source``'s distribution and rendered at ``size`` px. Each
    causal factor is moved by its class gap (target shift minus source shift, in the factor's
    units), each non-periodic nuisance factor by ``NUISANCE_SHIFT_SD`` sds; ``all causal`` moves
    every causal factor at once. ``to_model`` maps (N, C, H, W) images in [0, 1] to the
    classifier's input; ``quantize`` rounds them to 8 bits first, as PNG data sets are stored.

    Returns ``{"n_cells", "source_class", "target_class", "factors": {name: {"kind", "shift",
    "shift_sd", "mean_delta_p", "delta_p_ci", "flip_rate"}}}`` (``shift`` and ``shift_sd`` are
    None for ``all causal``, kind ``combined``); ``mean_delta_p`` is the mean
    change of p(target) with a bootstrap 95 % CI over cells, ``flip_rate`` the share of cells
    not predicted as the target before the move and predicted as it after.
    """
    if source not in spec.conditions or target not in spec.conditions:
        raise DiffexError(
            f"classifier sensitivity: classes {source!r} and {target!r} must both be conditions "
            f"of the spec ({', '.join(spec.condition_names)})"
        )
    if n_cells < 2:
        raise DiffexError(f"classifier sensitivity: n_cells must be >= 2, got {n_cells}")
    moves: dict[str, tuple[str, float, float]] = {}  # name -> (kind, shift in units, in sds)
    for name in spec.causal:
        sds = spec.shift(target, name) - spec.shift(source, name)
        if sds != 0:
            moves[name] = ("causal", sds * spec.factors[name].scale, sds)
    for name in spec.nuisance:
        if KNOWN_FACTORS[name].periodic is None:
            shift = NUISANCE_SHIFT_SD * spec.factors[name].scale
            moves[name] = ("nuisance", shift, NUISANCE_SHIFT_SD)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    cells = sample_factors(spec, source, n_cells, rng)
    roles = spec.roles

    def p_of(factor_sets: list[dict[str, float]]) -> np.ndarray:
        unit = np.stack([_render(f, size, seed, i, roles) for i, f in enumerate(factor_sets)])
        if quantize:
            unit = np.round(unit * 255.0) / 255.0
        return probs(torch.from_numpy(to_model(unit.astype(np.float32)))).numpy()

    p0 = p_of(cells)
    sets = {name: {name: shift} for name, (_, shift, _) in moves.items()}
    causal_moves = {n: m[1] for n, m in moves.items() if m[0] == "causal"}
    if causal_moves:
        sets[ALL_CAUSAL] = causal_moves
    boot = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    out: dict[str, Any] = {}
    for name, move in sets.items():
        p1 = p_of([_moved(spec, c, move) for c in cells])
        delta = p1[:, target_index] - p0[:, target_index]
        kind, shift, sds = moves.get(name, ("combined", None, None))
        out[name] = {
            "kind": kind,
            "shift": shift,
            "shift_sd": sds,
            **effect(p0, p1, target_index),
            "delta_p_ci": _bootstrap_ci(delta, n_boot, boot),
        }
    return {"n_cells": n_cells, "source_class": source, "target_class": target, "factors": out}
