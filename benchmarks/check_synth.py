"""Check the synthetic benchmark: factor recovery, class separation, speed.

Usage: python benchmarks/check_synth.py [--n 3000] [--seed 0] [--spec PATH] [--out DIR]

Prints, for the spec (default: the packaged default), the Spearman rho between each ground-truth
factor and its measurement, the per-class factor means, the accuracy of a logistic regression on
the ground-truth causal factors (close to the Bayes accuracy) and on the measured ones, and the
time to generate and to measure the images.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm, spearmanr

from diffex.data.images import read_unit
from diffex.data.measure import CIRCULAR, FACTOR_MEASURES, axial_components, measure_batch
from diffex.data.spec import load_spec
from diffex.data.synth import generate


def logistic_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 2000) -> float:
    """Held-out accuracy (2/3 train, 1/3 test) of a softmax regression fit by gradient descent."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    cut = 2 * len(y) // 3
    tr, te = idx[:cut], idx[cut:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-12
    xs = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    k = int(y.max()) + 1
    onehot = np.eye(k)[y]
    w = np.zeros((xs.shape[1], k))
    for _ in range(steps):
        z = xs[tr] @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * xs[tr].T @ (p - onehot[tr]) / len(tr) + 1e-4 * w
    return float(((xs[te] @ w).argmax(1) == y[te]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec", default=None)
    ap.add_argument("--out", default=None, help="keep the dataset here (default: a temp dir)")
    args = ap.parse_args()
    spec = load_spec(args.spec)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "synth"
        t0 = time.perf_counter()
        generate(spec, out, args.n, args.seed, overwrite=True)
        t_gen = time.perf_counter() - t0
        rows = list(csv.DictReader(open(out / "factors.csv")))
        imgs = np.stack([read_unit(out / r["path"], len(spec.channels)) for r in rows])
    channels = {c.role: i for i, c in enumerate(spec.channels)}
    t0 = time.perf_counter()
    meas = measure_batch(imgs, channels=channels)
    t_meas = time.perf_counter() - t0

    classes = spec.condition_names
    y = np.array([classes.index(r["condition"]) for r in rows])
    truth = {f: np.array([float(r[f]) for r in rows]) for f in spec.factors}

    print(f"spec {spec.name}: n={args.n} seed={args.seed} size={spec.image_size}")
    print(f"generate: {t_gen:.1f} s ({1e3 * t_gen / args.n:.2f} ms/image, incl. PNG writing)")
    print(f"measure:  {t_meas:.1f} s ({1e3 * t_meas / args.n:.2f} ms/image)")
    print()
    head = f"{'factor':16s} {'kind':8s} {'shift':>12s} {'rho':>6s}  " + "  ".join(
        f"{'truth ' + c:>16s} {'meas ' + c:>16s}" for c in classes
    )
    print(head)
    for f, fac in spec.factors.items():
        gt, me = truth[f], meas[FACTOR_MEASURES[f]]
        if f in CIRCULAR:
            sel = truth.get("elongation", np.full(len(gt), 2.0)) >= 1.3
            (c1, s1), (c2, s2) = axial_components(gt[sel]), axial_components(me[sel])
            rho = min(spearmanr(c1, c2)[0], spearmanr(s1, s2)[0])
            means = []
            for k in range(len(classes)):
                cgt, sgt = axial_components(gt[y == k])
                cme, sme = axial_components(me[y == k])
                means.append(
                    f"{f'R={math.hypot(cgt.mean(), sgt.mean()):.2f}':>16s} "
                    f"{f'R={math.hypot(np.nanmean(cme), np.nanmean(sme)):.2f}':>16s}"
                )
        else:
            rho = spearmanr(gt, me, nan_policy="omit")[0]
            means = [
                f"{gt[y == k].mean():16.4g} {np.nanmean(me[y == k]):16.4g}"
                for k in range(len(classes))
            ]
        shifts = ",".join(f"{spec.shift(c, f):+.1f}" for c in classes)
        print(f"{f:16s} {fac.kind:8s} {shifts:>12s} {rho:6.3f}  " + "  ".join(means))
    print(
        "(rotation: min of the rhos of cos 2t and sin 2t over cells with elongation >= 1.3;"
        " class means shown as the mean resultant length R)"
    )
    print()

    causal = spec.causal
    x_gt = np.stack([truth[f] for f in causal], 1)
    x_me = np.stack([meas[FACTOR_MEASURES[f]] for f in causal], 1)
    x_all = np.stack([meas[FACTOR_MEASURES[f]] for f in spec.factors if f not in CIRCULAR], 1)
    ok = np.isfinite(x_me).all(1) & np.isfinite(x_all).all(1)
    print(f"logistic regression, held-out accuracy (causal = {causal}):")
    print(f"  ground-truth causal factors: {logistic_accuracy(x_gt, y):.3f}")
    print(f"  measured causal factors:     {logistic_accuracy(x_me[ok], y[ok]):.3f}")
    print(f"  all measured factors:        {logistic_accuracy(x_all[ok], y[ok]):.3f}")
    if len(classes) == 2:
        d = math.sqrt(sum(spec.shift(classes[1], f) ** 2 for f in causal))
        print(
            f"  Bayes accuracy, Gaussian approximation Phi(D/2), D = {d:.2f}: {norm.cdf(d / 2):.3f}"
        )


if __name__ == "__main__":
    main()
