"""Probe: where along a ranked direction's sweep the imaging changes, and whether it changes
where the edit stays within the data. For the top ranked directions and the class-mean reference
of a run, three half sweeps of ``--images`` held-out cells are decoded (20 DDIM steps, as
``diffex explain`` does):

- ``forward``: source-class cells from alpha 0 to the direction's alpha (the counterfactual);
- ``back, target``: target-class cells from -alpha to 0 (treated cells moved back towards the
  control cells, mostly within the data);
- ``back, source``: source-class cells from -alpha to 0 (the explanation's reverse half, past the
  source cells).

Each prints the mean p(target) at every alpha, the share of cells past the training data along
the class axis (``diffex.explain.support``), and Spearman rho between alpha and each measurement
(``diffex.data.measure``, over all (cell, alpha) pairs of the half, as the explanation measures
its sweep). ``noise, ring`` is the background noise read in a fixed 4-pixel frame border, so that
a cell mask that shrinks with the edit cannot move it.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/sweep_halves.py RUN [--images 24] [--top 2]``
(RUN: a run folder with rank done). Numbers: BENCHMARKS.md, "Conditioning on the classifier's
features".
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_run import open_run

from diffex.data.loading import load_split
from diffex.data.measure import measure_batch, noise_sd
from diffex.explain.explain import decode_sweep, edited_latents, spearman
from diffex.explain.latents import encode_cached
from diffex.explain.rank import prober
from diffex.explain.support import axis_range, past_data_share
from diffex.train.autoencoder import semantic_latents

SHOWN = ("nucleus_area", "actin_intensity", "spot_count", "cell_area", "background", "noise")
SHOWN_LAST = ("brightness",)
RING = 4


def ring_noise(unit: np.ndarray) -> np.ndarray:
    """Background noise of (M, C, H, W) images in [0, 1], read in a fixed ``RING``-pixel
    border as ``diffex.data.measure`` reads it (sd from the half above the median), channel
    mean."""
    ring = np.zeros(unit.shape[-2:], dtype=bool)
    ring[:RING] = ring[-RING:] = True
    ring[:, :RING] = ring[:, -RING:] = True
    return noise_sd(unit[..., ring], axis=-1).mean(-1)  # (M, C, P) pixels -> (M,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--top", type=int, default=2, help="ranked directions to probe")
    ap.add_argument("--levels", type=int, default=4, help="alphas per half, 0 included")
    args = ap.parse_args()
    run = open_run(args.run)
    plan, dset, ae, held, target = run.plan, run.dset, run.ae, run.held, run.target
    rng = np.random.default_rng(1)
    y = held.y.numpy()
    cells = {}
    for name, pick in (("source", y != target), ("target", y == target)):
        idx = np.sort(rng.permutation(np.flatnonzero(pick))[: args.images])
        z, x_T = encode_cached(ae, args.run, held.x[idx], [held.paths[i] for i in idx], 20, 128)
        cells[name] = (z, x_T)
    bounds = axis_range(dset.space, semantic_latents(ae, load_split(plan, "train").x), target)
    probs = prober(ae)
    floor = run.spot_floor()
    for item in [*dset.items[: args.top], *([dset.reference] if dset.reference else [])]:
        print(f"== {item.name} (alpha {item.alpha:.2f} class gaps)")
        up = np.linspace(0, item.alpha, args.levels)
        for half, who, alphas in (
            ("forward", "source", up),
            ("back, target", "target", -up[::-1]),
            ("back, source", "source", -up[::-1]),
        ):
            z, x_T = cells[who]
            moved = edited_latents(dset.space, z, item.units, alphas)
            frames = decode_sweep(ae, moved, x_T, len(alphas), 20, 128)
            flat = frames.reshape(-1, *frames.shape[2:])
            p = probs(flat)[:, target].reshape(len(alphas), -1).numpy().mean(1)
            per = moved.reshape(len(alphas), len(z), -1)
            past = [past_data_share(dset.space, m, target, bounds) for m in per]
            unit = np.asarray(plan.normalization.to_unit(flat))
            values = measure_batch(unit, plan.measure_channels, spot_floor=floor)
            values["noise, ring"] = ring_noise(unit)
            a = np.repeat(alphas, len(z))
            shown = [*SHOWN, "noise, ring", *SHOWN_LAST]
            rhos = ", ".join(f"{k} {spearman(a, values[k]):+.2f}" for k in shown)
            shares = [round(float(v), 2) for v in past]
            print(f"  {half:13s} p {[round(float(v), 2) for v in p]} past {shares}")
            print(f"  {'':13s} rho: {rhos}")


if __name__ == "__main__":
    main()
