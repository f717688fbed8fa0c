"""Probe: edit from a partly inverted image instead of from x_T. DDIM inversion stops at step
``t_max`` (the first of the explanation's 20 levels up to it) and the edit is decoded from there
with the edited z_sem over the same levels, so the image's own content above that noise level,
the background's texture among it, is kept and only what the lower levels decide can change.
For the top ranked direction and the class-mean reference of a run, the explanation's sweep
(``--alphas`` from -alpha to +alpha, held-out control cells) is decoded at each ``--t-max`` and
measured as ``diffex explain`` measures it: mean p(target) at the ends, and Spearman rho between
alpha and each measurement over the whole sweep and over its half towards the target.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/partial_inversion.py RUN [--images 24]
[--t-max 999 599 399]`` (RUN: a run folder with rank done). Numbers: BENCHMARKS.md,
"Conditioning on the classifier's features".
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_run import open_run

from diffex.diffusion import ddim_steps
from diffex.explain.explain import edited_latents, factor_trends
from diffex.explain.rank import prober, source_images

SHOWN = (
    "nucleus_area",
    "actin_intensity",
    "spot_count",
    "cell_area",
    "offset_x",
    "background",
    "noise",
    "brightness",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--alphas", type=int, default=7)
    ap.add_argument("--t-max", type=int, nargs="+", default=[999, 599, 399])
    args = ap.parse_args()
    run = open_run(args.run)
    plan, dset, ae, held, target = run.plan, run.dset, run.ae, run.held, run.target
    x, _ = source_images(plan, target, args.images, 1, data=held)
    probs = prober(ae)
    floor = run.spot_floor()
    levels = ddim_steps(ae.schedule.T, 20)
    items = [*dset.items[:1], *([dset.reference] if dset.reference else [])]
    for t_max in args.t_max:
        steps = [t for t in levels if t <= t_max]
        z, x_t = ae.encode(x, steps)
        print(f"== t_max {t_max}: {len(steps)} of 20 levels")
        for item in items:
            alphas = np.linspace(-item.alpha, item.alpha, args.alphas)
            moved = edited_latents(dset.space, z, item.units, alphas)
            frames = ae.decode(moved, x_t.repeat(len(alphas), 1, 1, 1), steps)
            p = probs(frames)[:, target].reshape(len(alphas), -1).numpy().mean(1)
            unit = np.asarray(plan.normalization.to_unit(frames))
            unit = unit.reshape(len(alphas), len(x), *unit.shape[1:])
            trends = factor_trends(unit, alphas, plan.measure_channels, floor)
            rhos = ", ".join(
                f"{k} {trends[k]['rho']:+.2f} ({trends[k]['rho_forward']:+.2f})" for k in SHOWN
            )
            print(f"  {item.name}: p(target) {p[0]:.2f} / {p[len(p) // 2]:.2f} / {p[-1]:.2f}")
            print(f"    rho over the sweep (towards the target): {rhos}")


if __name__ == "__main__":
    main()
