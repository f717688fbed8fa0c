"""Would ``diffex rank`` keep the same restart if it chose on fewer of its source images?

    python benchmarks/restart_choice_subset.py RUN [RUN ...] --n 16

For each finished run (with restarts), decodes every (direction, sign) edit of ``--n`` of the
ranking's own source images, once for its first ``--n`` and once for ``--n`` drawn at random
(seeded with the ranking's seed + 1), applies the ranking's artifact guard and choice rule
(``best_restart``), and prints the choice beside the one ranking.json made on all images.
Nothing in the run is changed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from diffex.explain.guard import artifact_flags, artifact_measures, reference_spread
from diffex.explain.latents import encode_cached
from diffex.explain.rank import RankConfig, decoder, prober, resolve_target, source_images
from diffex.explain.ranking import SIGNS, best_restart, edit_effects
from diffex.io.atomic import read_json
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import direction_sets, load_editor


def choose_on(run: Path, idx: np.ndarray, device: torch.device) -> tuple[int, list[float], float]:
    """(chosen restart, each set's best mean delta-p, seconds) on source images ``idx``."""
    t0 = time.perf_counter()
    plan = RunDir(run).load_plan()
    ranking = read_json(run / "ranking.json")
    cfg = RankConfig(**ranking["config"])
    target = resolve_target(plan, cfg.target)
    ae, editor = load_autoencoder(run, device), load_editor(run, device)
    k_set, _ = direction_sets(read_json(run / "directions" / "config.json"), editor.k)
    x, paths = source_images(plan, target, cfg.n_images, cfg.seed)
    x, paths = x[idx], [paths[i] for i in idx]
    z, x_T = encode_cached(ae, run, x, paths, cfg.ddim_steps, cfg.batch_size)

    def edit_fn(zz: torch.Tensor, k: int, sign: int, a: float) -> torch.Tensor:
        with torch.no_grad():
            return editor.edit(zz, k, sign, a)

    effects = edit_effects(
        z,
        x_T,
        edit_fn,
        decoder(ae, cfg.ddim_steps, cfg.batch_size),
        prober(ae),
        editor.k,
        float(ranking["alpha"]),
        target,
        batch_size=cfg.batch_size,
        keep_images=True,
    )
    unit = plan.normalization.to_unit
    spread, recon = reference_spread(unit(x)), unit(effects.recon)
    flags = {
        (k, s): artifact_flags(artifact_measures(recon, unit(effects.edited[k, si])), spread)
        for k in range(editor.k)
        for si, s in enumerate(SIGNS)
    }
    chosen, best = best_restart(
        effects, target, k_set, flags, not cfg.keep_flagged, np.arange(len(x))
    )
    return chosen, best, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--n", type=int, default=16, help="source images to choose on")
    args = ap.parse_args()
    device = torch.device("cpu")
    for run in args.runs:
        ranking = read_json(run / "ranking.json")
        full, n_all = ranking["restarts"], int(ranking["n_images"])
        rng = np.random.default_rng(int(ranking["config"]["seed"]) + 1)
        subsets = {
            f"first {args.n}": np.arange(args.n),
            f"random {args.n}": np.sort(rng.permutation(n_all)[: args.n]),
        }
        shown = ", ".join(f"{b:.3f}" for b in full["best_mean_delta_p"])
        print(f"{run}: all {n_all} images keep restart {full['chosen']} ({shown})")
        for name, idx in subsets.items():
            chosen, best, sec = choose_on(run, idx, device)
            shown = ", ".join(f"{b:.3f}" for b in best)
            print(f"  {name}: restart {chosen} ({shown}), {sec:.0f} s")


if __name__ == "__main__":
    main()
