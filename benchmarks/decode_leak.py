"""Probe: does what the directions are trained on see the imaging change that the explanation's
decode makes? Control cells are moved along the class-mean direction (``--alpha`` class gaps
each way) and three decodes of every edit are measured against the same decode of the unedited
cell, with the invariance penalty's statistics (:mod:`diffex.models.nuisance`, in natural sds of
real images):

1. the one-step x0 estimate from the noised real image at each ``--t`` (what training uses);
2. DDIM from the inverted x_T with few steps (``--few``), and the full ``--steps`` decode;
3. the full decode with the unedited z for its last ``--anchor`` steps, read with the benchmark's
   measurements (``diffex.data.measure``, change in sds of the unedited decodes), to see whether
   the late steps carry the leak without the phenotype.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_leak.py RUN [--images 24] [--alpha 2]``
(RUN: a run folder with a trained autoencoder and directions). Numbers: BENCHMARKS.md,
"Holding the cell's outline".
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffex.data.loading import load_split
from diffex.data.measure import measure_batch
from diffex.diffusion import ddim_coefficients, ddim_levels, q_sample, t_batch
from diffex.models.nuisance import background_mask, natural_spread, statistics
from diffex.models.nuisance import names as stat_names
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import load_editor, one_step_x0

FEATURES = ("nucleus_area", "actin_intensity", "brightness", "noise", "background", "cell_area")


def decode(ae, z_edit, z_late, x_T, steps: int, n_late: int) -> torch.Tensor:
    """DDIM from ``x_T`` conditioned on ``z_edit``, then on ``z_late`` for the last ``n_late``
    steps; clamped to [-1, 1]."""
    ts, abar = ddim_levels(ae.schedule, steps)
    x, n = x_T.clone(), len(ts)
    with torch.inference_mode():
        for i, k in enumerate(range(n, 0, -1)):
            z = z_late if i >= n - n_late else z_edit
            eps = ae.eps_fn()(x, t_batch(ts[k - 1], x), z)
            a, b = ddim_coefficients(abar[k], abar[k - 1])
            x = a * x + b * eps
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=20, help="the full decode's DDIM steps")
    ap.add_argument("--encode-steps", type=int, default=10)
    ap.add_argument("--t", type=int, nargs="+", default=[150, 250, 400, 600, 800])
    ap.add_argument("--few", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--anchor", type=int, nargs="+", default=[0, 3, 5, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    ae = load_autoencoder(args.run, "cpu").eval().requires_grad_(False)
    space = load_editor(args.run, torch.device("cpu")).space
    plan = RunDir(args.run).load_plan()
    val = load_split(plan, "val")
    x = val.x[val.y == 0][: args.images]
    gain = plan.measure_channels.get("nucleus")
    spread = natural_spread(load_split(plan, "train").x[:500], gain)
    z, x_T = ae.encode(x, steps=args.encode_steps)
    unit = space.class_direction(0, 1)[None].repeat(len(z), 1)
    moved = {a: space.shift(z, unit, torch.full((len(z),), a)) for a in (-args.alpha, args.alpha)}
    print("statistics:", ", ".join(stat_names(gain)), "(change in natural sds, mean over cells)")

    def change(base: torch.Tensor, edited: torch.Tensor) -> str:
        mask = background_mask(base)
        d = (statistics(edited, mask, gain) - statistics(base, mask, gain)) / spread
        return np.array2string(d.mean(0).numpy(), precision=2, suppress_small=True)

    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    for t_edit in args.t:
        t = torch.full((len(x),), t_edit)
        x_t = q_sample(ae.schedule, x, t, noise)
        base = one_step_x0(ae, x_t, t, z)
        row = [change(base, one_step_x0(ae, x_t, t, moved[a])) for a in moved]
        print(f"one-step x0 at t {t_edit:4d}: -alpha {row[0]}  +alpha {row[1]}")
    for steps in [*args.few, args.steps]:
        base = decode(ae, z, z, x_T, steps, 0)
        row = [change(base, decode(ae, moved[a], z, x_T, steps, 0)) for a in moved]
        print(f"DDIM {steps:2d} steps from x_T: -alpha {row[0]}  +alpha {row[1]}")
    base = decode(ae, z, z, x_T, args.steps, 0)
    ref = measure_batch(((base + 1) / 2).numpy())
    for n_late in args.anchor:
        for a, za in moved.items():
            m = measure_batch(((decode(ae, za, z, x_T, args.steps, n_late) + 1) / 2).numpy())
            d = {f: np.nanmean(m[f] - ref[f]) / np.nanstd(ref[f]) for f in FEATURES}
            print(
                f"last {n_late} of {args.steps} steps unedited, alpha {a:+.1f}: "
                + ", ".join(f"{f} {v:+.2f}" for f, v in d.items())
            )


if __name__ == "__main__":
    main()
