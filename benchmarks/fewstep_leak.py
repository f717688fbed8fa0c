"""Probe: do few-step decodes from the exact inversion show the imaging leaks of the full sweep?

For a run's top ranked direction, 24 held-out source cells are inverted and decoded at each
``--steps`` (exact inversion at that many DDIM steps), swept over 9 alphas across its
calibrated edit. Prints the Spearman rho between alpha and the measured causal and imaging
factors (as ``diffex explain`` measures them), and the mean change of the invariance penalty's
statistics (background, centroid x and y, nucleus gain) at -alpha and +alpha against the
unedited decode. If a few-step decode shows the leak, a penalty on it can hold it in training
(``--decoded-invariance``).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/fewstep_leak.py RUN [--steps 20 4 2]`` (RUN: a
run folder with rank done). Numbers: BENCHMARKS.md, "Decoded invariance".
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffex.data.loading import load_split
from diffex.data.measure import measure_batch
from diffex.explain.explain import spearman
from diffex.explain.rank import heldout_split, source_images
from diffex.io.atomic import read_json
from diffex.models.nuisance import background_mask, statistics
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import load_editor

FACTORS = ("nucleus_area", "actin_intensity", "background", "noise", "brightness", "cell_area")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 4, 2])
    parser.add_argument("--cells", type=int, default=24)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    plan = RunDir(args.run).load_plan()
    ranking = read_json(f"{args.run}/ranking.json")
    target = plan.classes.index(ranking["target_class"])
    ae = load_autoencoder(args.run, "cpu", precision="auto")
    editor = load_editor(args.run, "cpu")
    held = load_split(plan, heldout_split(plan))
    x, _ = source_images(plan, target, args.cells, 1, data=held)
    top = ranking["directions"][0]
    k, sign, alpha = int(top["direction"]), int(top["sign"]), float(top["alpha"])
    alphas = np.linspace(-alpha, alpha, 9)
    gain = plan.measure_channels.get("nucleus")
    print(f"{args.run}: direction {k} ({sign:+d}), alpha {alpha:.2f}, {len(x)} cells")
    for steps in args.steps:
        z, x_T = ae.encode(x, steps=steps, batch_size=64)
        images = [
            ae.decode(editor.edit(z, k, sign, float(a)) if a else z, x_T, steps, batch_size=64)
            for a in alphas
        ]
        base = images[len(alphas) // 2]
        mask = background_mask(base)
        stats = torch.stack([statistics(im, mask, gain) for im in images])
        change = (stats - stats[len(alphas) // 2]).mean(1).numpy()
        unit = np.concatenate([np.asarray(plan.normalization.to_unit(im)) for im in images])
        values = measure_batch(unit, plan.measure_channels)
        a_rep = np.repeat(alphas, len(x))
        rhos = "  ".join(f"{f} {spearman(a_rep, values[f]):+.2f}" for f in FACTORS)
        print(f"steps {steps}: rho {rhos}")
        lo, hi = np.round(change[0], 4), np.round(change[-1], 4)
        print(f"  statistics' change at -alpha {lo}, +alpha {hi}")


if __name__ == "__main__":
    main()
