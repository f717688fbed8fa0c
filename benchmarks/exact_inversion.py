"""Benchmark: how exact DDIM round trips are with and without fixed-point refined inversion.

For held-out control cells of a run, each ``--setting`` (``refine:tol``; ``0`` is plain
inversion) is encoded and decoded at each ``--steps``, and reported with the round trip's PSNR,
the UNet calls per image that encoding took, the encode time, and the background level and
noise sd that ``diffex explain`` measures, mean over the cells beside the real cells' (plain
inversion loses both: its reconstructions are smoother and darker than the cells).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/exact_inversion.py RUN [--images 32]
[--steps 10 20] [--setting 0 10:0.01 10:0.003]`` (RUN: a run folder with the autoencoder
trained). Numbers: BENCHMARKS.md, "Exact inversion".
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from diffex.data.loading import load_split
from diffex.data.measure import measure_batch
from diffex.evaluate.fidelity import pixel_metrics
from diffex.explain.rank import heldout_split
from diffex.rundir import RunDir
from diffex.runtime import seed_everything
from diffex.train.autoencoder import load_autoencoder


def _setting(text: str) -> tuple[int, float]:
    refine, _, tol = text.partition(":")
    return int(refine), float(tol or 1e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--setting", nargs="+", default=["0", "10:0.01", "10:0.003"])
    args = ap.parse_args()
    seed_everything(0)
    torch.set_num_threads(2)
    plan = RunDir(args.run).load_plan()
    held = load_split(plan, heldout_split(plan))
    x = held.x[held.y == 0][: args.images]
    ae = load_autoencoder(args.run, "cpu", precision="auto")
    calls = [0]
    forward = ae.unet.forward

    def counted(x_t: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls[0] += len(x_t)
        return forward(x_t, *a, **k)

    ae.unet.forward = counted  # type: ignore[method-assign]
    channels = plan.measure_channels
    real = measure_batch(plan.normalization.to_unit(x), channels)
    print(f"{platform.processor() or platform.machine()}, {len(x)} cells, {ae.decode_precision}")
    print(
        f"real cells: background {np.nanmean(real['background']):.4f}, "
        f"noise {np.nanmean(real['noise']):.4f}"
    )
    print("steps  setting      PSNR dB  calls/img  encode s  background  noise")
    for steps in args.steps:
        for text in args.setting:
            ae.inversion_refine, ae.inversion_tol = _setting(text)
            calls[0] = 0
            t0 = time.perf_counter()
            z, x_T = ae.encode(x, steps)
            seconds = time.perf_counter() - t0
            per_image = calls[0] / len(x)
            rec = ae.decode(z, x_T, steps)
            psnr = pixel_metrics(x, rec)["psnr"]
            got = measure_batch(plan.normalization.to_unit(rec), channels)
            print(
                f"{steps:5d}  {ae.inversion:11s} {psnr:8.1f}  {per_image:9.0f}  {seconds:8.1f}"
                f"  {np.nanmean(got['background']):10.4f}  {np.nanmean(got['noise']):.4f}"
            )


if __name__ == "__main__":
    main()
