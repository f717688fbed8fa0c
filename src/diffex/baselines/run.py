"""``diffex baseline gcd``: GCD directions on a run's own autoencoder and classifier, written to
``RUN/baselines/gcd/`` in the shape of DiffEx's ranking, so explain and evaluate treat both
alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffex.baselines.gcd import GCDConfig, line_search, search
from diffex.config import INVERSION_REFINE
from diffex.data.loading import DataPlan, load_split
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import effect
from diffex.explain.latents import encode_cached
from diffex.explain.methods import method_folder
from diffex.explain.rank import prober, resolve_target, source_images, source_split
from diffex.io.atomic import write_json
from diffex.io.checkpoint import save_weights
from diffex.log import info, track
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.models.directions import LatentSpace
from diffex.rundir import RunDir
from diffex.runtime import check_inversion_refine, check_precision
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import semantic_latents

DISTANCE = (
    "L2 distance between the explained classifier's penultimate features of the decoded "
    "perturbation and of the unedited reconstruction, divided by the latter's norm"
)


@dataclass
class GCDRunConfig:
    """Settings of ``diffex baseline gcd``."""

    target: str | None = None
    source_images: int = 1
    m: int = 5
    n_images: int = 64
    ddim_steps: int = 20
    batch_size: int = 128
    search: GCDConfig = field(default_factory=GCDConfig)
    seed: int = 0
    #: auto, fp32 or bf16 DDIM inversion and decoding, as rank and explain (runtime.PRECISIONS).
    precision: str = "auto"
    #: Fixed-point refinement of the DDIM inversion, as rank and explain (0: plain).
    inversion_refine: int = INVERSION_REFINE

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_inversion_refine(self.inversion_refine)
        if self.source_images < 1 or self.m < 1 or self.n_images < 1 or self.ddim_steps < 1:
            raise DiffexError("gcd: source_images, m, n_images and ddim_steps must be >= 1")


def fit_space(ae: DiffusionAutoencoder, plan: DataPlan) -> LatentSpace:
    """Standardisation and class geometry of z_sem from the training split (as the directions
    stage fits it), so GCD's steps are in the same class-gap units as DiffEx's alpha."""
    train = load_split(plan, "train")
    z = semantic_latents(ae, train.x)
    return LatentSpace(z.shape[1], len(plan.classes)).fit(z, train.y)


def _log_odds(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def gcd_run(run: str | Path, cfg: GCDRunConfig, device: torch.device) -> dict[str, Any]:
    """Search GCD directions on ``cfg.source_images`` images, rank them by their global effect on
    held-out images, and write ``RUN/baselines/gcd/`` (ranking.json, directions, space)."""
    rd = RunDir(run)
    plan = rd.load_plan()
    target = resolve_target(plan, cfg.target)
    ae = load_autoencoder(
        run, device, precision=cfg.precision, inversion_refine=cfg.inversion_refine
    )
    info("gcd: fitting the latent space on training latents")
    space = fit_space(ae, plan).to(device)
    probs = prober(ae)
    clf = ae.classifier
    steps, bs = cfg.ddim_steps, cfg.batch_size

    def decode(z: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
        return ae.decode(z, x_T.expand(len(z), -1, -1, -1), steps=steps, batch_size=bs)

    candidates: list[dict[str, Any]] = []
    vectors: list[torch.Tensor] = []
    fits: list[dict[str, Any]] = []
    # validation images: the global ranking and evaluation use the test split
    xs, _, keys = source_split(plan, target, cfg.source_images, cfg.seed + 11, split="val")
    for j in track(range(len(xs)), "gcd: source images", total=len(xs)):
        z, x_T = encode_cached(ae, run, xs[j : j + 1], keys[j : j + 1], steps, bs)
        z = z.to(device)
        with torch.no_grad():
            f0 = clf.features(decode(z, x_T).to(device)).float()
        norm = f0.norm().clamp_min(1e-8)

        def oracle(
            d: torch.Tensor,
            z: torch.Tensor = z,
            x_T: torch.Tensor = x_T,
            f0: torch.Tensor = f0,
            norm: torch.Tensor = norm,
        ) -> Any:
            x = decode(space.shift(z, d, 1.0), x_T)
            with torch.no_grad():
                p = probs(x)[:, target]
                f = clf.features(x.to(device)).float()
            return _log_odds(p), ((f - f0).norm(dim=1) / norm).cpu()

        scfg = GCDConfig(**{**asdict(cfg.search), "seed": cfg.search.seed + cfg.seed + j})
        res = search(oracle, z.shape[1], scfg)
        fits.append({"source_image": j, "rounds": res["fits"]})
        for kind, v in res["directions"]:
            v = v.to(z)

            def along(t: float, v: torch.Tensor = v, z: torch.Tensor = z, x_T: Any = x_T) -> float:
                return float(probs(decode(space.shift(z, v, t), x_T))[0, target])

            ls = line_search(along, scfg.max_step, scfg.bisections)
            candidates.append({"name": f"img{j}_{kind}", "kind": kind, "source_image": j, **ls})
            vectors.append(v.detach().cpu())
    if not candidates:
        raise DiffexError("gcd: the search found no directions")

    # global effect: every candidate, with its own step, on the held-out images DiffEx ranks on
    x, xkeys = source_images(plan, target, cfg.n_images, cfg.seed)
    info(f"gcd: applying {len(candidates)} directions to {len(x)} held-out images")
    z, x_T = encode_cached(ae, run, x, xkeys, steps, bs)
    p0 = probs(ae.decode(z, x_T, steps=steps, batch_size=bs)).numpy()
    for c, v in zip(candidates, vectors, strict=True):
        moved = space.shift(z, v, c["step"])
        pe = probs(ae.decode(moved, x_T, steps=steps, batch_size=bs)).numpy()
        c.update(effect(p0, pe, target))
    order = sorted(
        range(len(candidates)),
        key=lambda i: (-candidates[i]["flip_rate"], -candidates[i]["mean_delta_p"]),
    )[: cfg.m]
    ranked = [{"rank": r + 1, "vector_index": i, **candidates[i]} for r, i in enumerate(order)]
    folder = method_folder(run, "gcd")
    save_weights(folder / "directions.safetensors", {"directions": torch.stack(vectors)})
    save_weights(folder / "space.safetensors", space.state_dict())
    result = {
        "method": "gcd",
        "target_class": plan.classes[target],
        "target_index": target,
        "alpha": max((d["step"] for d in ranked), default=1.0),
        "n_images": len(x),
        "ddim_steps": steps,
        "precision": ae.decode_precision,
        "inversion": ae.inversion,
        "source_classes": [c for i, c in enumerate(plan.classes) if i != target],
        "distance": DISTANCE,
        "directions": ranked,
        "candidates": candidates,
        "proxy_fits": fits,
        "config": asdict(cfg),
    }
    write_json(folder / "ranking.json", result)
    for d in ranked:
        info(
            f"gcd: {d['rank']}. {d['name']}: step {d['step']:.2f} class gaps"
            f"{'' if d['crossed'] else ' (no crossing)'}, delta-p {d['mean_delta_p']:+.3f}, "
            f"flip rate {d['flip_rate']:.2f}"
        )
    return result
