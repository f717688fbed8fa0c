"""Ranking stage: AttFind over the learned directions for one target class, with the artifact
guard and the class-mean direction as a supervised reference; writes ``RUN/ranking.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffex.config import INVERSION_REFINE
from diffex.data.loading import DataPlan, SplitData, load_split
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import effect
from diffex.explain.guard import artifact_flags, artifact_measures, reference_spread
from diffex.explain.latents import encode_cached
from diffex.explain.legibility import class_gaps, edit_measurements, real_class_stats
from diffex.explain.ranking import (
    SIGNS,
    attfind,
    best_restart,
    edit_effects,
    format_ranking,
    restart_margin,
)
from diffex.io.atomic import read_json, write_json
from diffex.log import info, warn
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.models.directions import LatentEditor
from diffex.rundir import RunDir
from diffex.runtime import check_gain_margin, check_inversion_refine, check_precision
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import direction_sets, load_editor


@dataclass
class RankConfig:
    """Settings of the ranking stage.

    ``precision``: auto, fp32 or bf16 DDIM decodes (the UNet under bf16 autocast; ``auto``:
    where the hardware has native bf16); the classifier, measurements and statistics stay fp32.
    ``gain_margin``: bound the UNet's z gains to their range over the training images, widened
    by this share of it (None: unbounded; BENCHMARKS: "Gains bounded to the data").
    ``inversion_refine``: fixed-point refinement of the DDIM inversion (0: plain; BENCHMARKS:
    "Exact inversion").
    ``legible_within``: 0 ranks by delta-p alone; a share > 0 lets each pick be the most
    legible edit (:mod:`diffex.explain.legibility`) among those within that share of the best
    delta-p (BENCHMARKS: "Legible edits")."""

    target: str | None = None
    alpha: float | None = None
    m: int = 5
    n_images: int = 64
    ddim_steps: int = 20
    threshold: float = 0.25
    min_explained: float = 0.05
    max_cosine: float = 0.9
    batch_size: int = 128
    keep_flagged: bool = False
    calibrate: bool = True
    flip_target: float | None = None
    calibration_images: int = 32
    calibration_steps: int = 4
    calibration_ddim_steps: int = 10
    seed: int = 0
    precision: str = "auto"
    gain_margin: float | None = None
    inversion_refine: int = INVERSION_REFINE
    legible_within: float = 0.0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_gain_margin(self.gain_margin)
        check_inversion_refine(self.inversion_refine)
        if self.flip_target is not None and not 0 < self.flip_target <= 1:
            raise DiffexError(f"flip_target must be in (0, 1], got {self.flip_target}")
        if min(self.calibration_images, self.calibration_steps, self.calibration_ddim_steps) < 1:
            raise DiffexError("calibration images, steps and DDIM steps must be >= 1")
        if self.m < 1:
            raise DiffexError(f"m (directions to rank) must be >= 1, got {self.m}")
        if not 0 < self.max_cosine <= 1:
            raise DiffexError(f"max_cosine must be in (0, 1], got {self.max_cosine}")
        if not 0 <= self.min_explained <= 1:
            raise DiffexError(f"min_explained must be a share in [0, 1], got {self.min_explained}")
        if not 0 <= self.legible_within < 1:
            raise DiffexError(
                f"legible_within must be a share in [0, 1), got {self.legible_within}"
            )
        if self.n_images < 1 or self.ddim_steps < 1:
            raise DiffexError("n_images and ddim_steps must be >= 1")


def resolve_target(plan: DataPlan, target: str | None) -> int:
    """Index of the target class; with two classes the default is the second (sorted) one."""
    if target is None:
        if len(plan.classes) != 2:
            raise DiffexError(
                f"--target is required with {len(plan.classes)} classes: choose one of "
                f"{', '.join(plan.classes)}"
            )
        return 1
    if target not in plan.classes:
        raise DiffexError(f"unknown target class {target!r}; classes: {', '.join(plan.classes)}")
    return plan.classes.index(target)


def source_images(
    plan: DataPlan, target: int, n: int, seed: int, data: SplitData | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Up to ``n`` held-out images of the other classes (test split, else validation);
    ``data``: that split, when the caller has already loaded it."""
    x, _, paths = source_split(plan, target, n, seed, data=data)
    return x, paths


def heldout_split(plan: DataPlan) -> str:
    """The split explanations are scored on: test, else validation."""
    return "test" if plan.splits.get("test") else "val"


def pick_other_classes(data: SplitData, split: str, target: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of up to ``n`` seeded-random images of ``data`` outside the target class."""
    idx = np.flatnonzero(data.y.numpy() != target)
    if len(idx) == 0:
        raise DiffexError(f"the {split} split has no images outside the target class")
    return np.sort(np.random.default_rng(seed).permutation(idx)[:n])


def source_split(
    plan: DataPlan,
    target: int,
    n: int,
    seed: int,
    split: str | None = None,
    data: SplitData | None = None,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """:func:`source_images` with the images' class indices: (x, y, paths), from ``split``
    (read from disk) or from ``data`` (the held-out split, :func:`heldout_split`, already
    loaded); with neither, the held-out split is read."""
    if split is not None and data is not None:
        raise ValueError("source_split takes a split name or its loaded data, not both")
    split = split or heldout_split(plan)
    data = data if data is not None else load_split(plan, split)
    idx = pick_other_classes(data, split, target, n, seed)
    return data.x[idx], data.y.numpy()[idx], [data.paths[i] for i in idx]


def decoder(ae: DiffusionAutoencoder, steps: int, batch_size: int):
    """Batched deterministic DDIM decoding as a plain function."""

    def decode(z: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
        return ae.decode(z, x_T, steps=steps, batch_size=batch_size)

    return decode


def prober(ae: DiffusionAutoencoder, batch_size: int = 256):
    """Classifier probabilities of images, in batches, without gradients."""

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    ae.classifier.probs(x[i : i + batch_size].to(ae.device)).float().cpu()
                    for i in range(0, len(x), batch_size)
                ]
            )

    return probs


def rank_directions(run: str | Path, cfg: RankConfig, device: torch.device) -> dict[str, Any]:
    """Encode source images once, decode every (direction, sign) edit, rank, write ranking.json."""
    rd = RunDir(run)
    plan = rd.load_plan()
    target = resolve_target(plan, cfg.target)
    ae = load_autoencoder(
        run,
        device,
        precision=cfg.precision,
        gain_margin=cfg.gain_margin,
        inversion_refine=cfg.inversion_refine,
    )
    editor = load_editor(run, device)
    dcfg = read_json(rd.stage("directions") / "config.json")
    alpha = float(cfg.alpha if cfg.alpha is not None else dcfg["train"]["alpha"])
    k_set, restarts = direction_sets(dcfg, editor.k)
    if cfg.m > k_set:
        raise DiffexError(f"cannot rank {cfg.m} directions: the run has only K = {k_set}")
    x, paths = source_images(plan, target, cfg.n_images, cfg.seed)
    info(f"rank: encoding {len(x)} source images ({cfg.ddim_steps} DDIM steps)")
    z, x_T = encode_cached(ae, run, x, paths, cfg.ddim_steps, cfg.batch_size)
    decode, probs = decoder(ae, cfg.ddim_steps, cfg.batch_size), prober(ae)

    def edit_fn(zz: torch.Tensor, k: int, sign: int, a: float) -> torch.Tensor:
        with torch.no_grad():
            return editor.edit(zz, k, sign, a)

    n_edits = editor.k * 2 * len(x)
    sets = f" ({restarts} restarts of {k_set})" if restarts > 1 else ""
    info(f"rank: decoding {n_edits} edits (K = {editor.k}{sets}, 2 signs, alpha = {alpha})")
    effects = edit_effects(
        z,
        x_T,
        edit_fn,
        decode,
        probs,
        editor.k,
        alpha,
        target,
        batch_size=cfg.batch_size,
        keep_images=True,
    )
    unit = plan.normalization.to_unit
    spread = reference_spread(unit(x))
    recon_unit = unit(effects.recon)
    flags: dict[tuple[int, int], list[str]] = {}
    pairs: list[dict[str, Any]] = []
    delta = effects.delta(target)
    flipped = (effects.pred_edit == target) & (effects.pred_recon != target)[None, None]
    edited_unit = unit(effects.edited)  # (K, 2, N, C, H, W), once for the guard and measures
    legibility, changes = measure_edits(plan, target, recon_unit, edited_unit)
    for k in range(editor.k):
        for si, sign in enumerate(SIGNS):
            measures = artifact_measures(recon_unit, edited_unit[k, si])
            flags[(k, sign)] = artifact_flags(measures, spread)
            pairs.append(
                {
                    "direction": k,
                    "restart": k // k_set,
                    "sign": sign,
                    "mean_delta_p": float(delta[k, si].mean()),
                    "flip_rate": float(flipped[k, si].mean()),
                    "artifact_flags": flags[(k, sign)],
                    "legibility": float(legibility[k, si]),
                    "measured": changes[k][si],
                }
            )
    chosen, restart = restart_choice(
        effects, target, k_set, restarts, flags, cfg, len(x), legibility
    )
    ranked = attfind(
        effects,
        target,
        cfg.m,
        threshold=cfg.threshold,
        flagged=flags,
        skip_flagged=not cfg.keep_flagged,
        images=np.arange(len(x)),
        min_explained=cfg.min_explained,
        shifts=mean_shifts(editor, z),
        max_cosine=cfg.max_cosine,
        candidates=range(chosen * k_set, (chosen + 1) * k_set),
        first_best=overall_best(restart),
        legibility=legibility,
        legible_within=cfg.legible_within,
    )
    info("rank:\n" + format_ranking(ranked) + f"\nrank: stopped because {ranked.stop_reason}")
    reference = class_mean_reference(
        editor, z, x_T, decode, probs, target, alpha, effects.p_recon(target), effects.pred_recon
    )
    ranked_dicts = [{**r.to_dict(), "alpha": alpha} for r in ranked]
    if cfg.calibrate:
        calibrate_alphas(ranked_dicts, reference, editor, ae, plan, target, alpha, cfg, probs, run)
    result = {
        "target_class": plan.classes[target],
        "target_index": target,
        "alpha": alpha,
        "n_images": len(x),
        "ddim_steps": cfg.ddim_steps,
        "precision": ae.decode_precision,
        "inversion": ae.inversion,
        "source_classes": [c for i, c in enumerate(plan.classes) if i != target],
        "directions": ranked_dicts,
        "stop_reason": ranked.stop_reason,
        "restarts": restart,
        "reference": reference,
        "all_pairs": pairs,
        "unedited_mean_p_target": float(effects.p_recon(target).mean()),
        "config": asdict(cfg),
    }
    write_json(rd.root / "ranking.json", result)
    return result


def restart_choice(
    effects: Any,
    target: int,
    k_set: int,
    restarts: int,
    flags: dict[tuple[int, int], list[str]],
    cfg: RankConfig,
    n_images: int,
    legibility: np.ndarray | None = None,
) -> tuple[int, dict[str, Any]]:
    """Which restart's directions AttFind ranks: the set whose best rankable edit raises
    p(target) most on the source images (:func:`diffex.explain.ranking.best_restart`), or with
    ``cfg.legible_within`` > 0 the set holding the most legible edit within that share of the
    best; the index and what ranking.json records about the choice."""
    if restarts == 1:
        return 0, {"n": 1, "k": k_set, "chosen": 0}
    args = (effects, target, k_set, flags, not cfg.keep_flagged, np.arange(n_images))
    legible = legibility is not None and cfg.legible_within > 0
    chosen, best = best_restart(*args, legibility=legibility, legible_within=cfg.legible_within)
    shown = ", ".join(f"{b:.3f}" for b in best)
    info(f"rank: best mean delta-p of each restart: {shown}; ranking restart {chosen}")
    rule = "the restart whose best edit (not flagged) raises p(target) most"
    margin: dict[str, Any] = {"runner_up": None, "margin": None, "margin_se": None, "close": False}
    if legible:  # the margin compares the sets' best delta-p, which this rule does not choose by
        rule = (
            "the restart holding the most legible edit (not flagged) among those within "
            f"{cfg.legible_within:.0%} of the best delta-p"
        )
    else:
        margin = restart_margin(*args)
    if margin["close"]:
        warn(
            f"rank: a close call: restart {chosen}'s best edit beats restart "
            f"{margin['runner_up']}'s by {margin['margin']:.3f} ± {margin['margin_se']:.3f} (SE "
            f"over {n_images} images); another sample of images could rank the other set"
        )
    return chosen, {
        "n": restarts,
        "k": k_set,
        "chosen": chosen,
        "best_mean_delta_p": [b if np.isfinite(b) else None for b in best],
        "rule": rule,
        **margin,
    }


def overall_best(restart: dict[str, Any]) -> float | None:
    """The best delta-p over every restart (None with one set or none rankable)."""
    best = [b for b in restart.get("best_mean_delta_p", []) if b is not None]
    return max(best) if best else None


def measure_edits(
    plan: DataPlan, target: int, recon_unit: torch.Tensor, edited_unit: torch.Tensor
) -> tuple[np.ndarray, list[list[dict[str, dict[str, float]]]]]:
    """Legibility (K, 2) and measured changes of every edit (:mod:`diffex.explain.legibility`),
    with changes as fractions of the class gap when there are two classes."""
    info("rank: measuring every edit against its reconstruction")
    stats, floor = real_class_stats(plan)
    gaps = None
    if len(plan.classes) == 2 and len(stats) == 2:
        gaps = class_gaps(stats, plan.classes[1 - target], plan.classes[target])
    return edit_measurements(
        np.asarray(recon_unit), np.asarray(edited_unit), plan.measure_channels, floor, gaps
    )


def mean_shifts(editor: LatentEditor, z: torch.Tensor) -> np.ndarray:
    """(K, D) mean unit shift of each direction (sign +) over latents ``z``, standardised."""
    with torch.no_grad():
        return editor.units(z).mean(1).float().cpu().numpy()


def class_mean_reference(
    editor: LatentEditor,
    z: torch.Tensor,
    x_T: torch.Tensor,
    decode: Any,
    probs: Any,
    target: int,
    alpha: float,
    p_recon: np.ndarray,
    pred_recon: np.ndarray,
) -> dict[str, Any]:
    """The supervised baseline: move every source latent by alpha class gaps from the mean of the
    other classes towards the target class mean (standardised z)."""
    unit = editor.space.towards(target)
    with torch.no_grad():
        p = probs(decode(editor.edit_along(z, unit, alpha), x_T))
    delta = p[:, target].numpy() - p_recon
    flips = (p.argmax(1).numpy() == target) & (pred_recon != target)
    return {
        "kind": "class_mean",
        "alpha": alpha,
        "mean_delta_p": float(delta.mean()),
        "flip_rate": float(flips.mean()),
    }


def smallest_alpha(rate_at: Any, alpha: float, target: float, steps: int) -> dict[str, Any]:
    """The smallest alpha in (0, ``alpha``] whose rate (``rate_at(alpha)``, rising with alpha)
    reaches ``target``, by bisection (``steps`` halvings after checking ``alpha`` itself). If
    ``alpha`` does not reach it, the edit is not enlarged: returns ``alpha`` with
    ``reached = False``."""
    trace = [{"alpha": float(alpha), "rate": float(rate_at(alpha))}]
    if trace[0]["rate"] < target:
        return {"alpha": float(alpha), "reached": False, "trace": trace}
    lo, hi = 0.0, float(alpha)
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = float(rate_at(mid))
        trace.append({"alpha": mid, "rate": f})
        if f >= target:
            hi = mid
        else:
            lo = mid
    return {"alpha": hi, "reached": True, "trace": trace}


def calibrate_alphas(
    ranked: list[dict[str, Any]],
    reference: dict[str, Any],
    editor: LatentEditor,
    ae: DiffusionAutoencoder,
    plan: DataPlan,
    target: int,
    alpha: float,
    cfg: RankConfig,
    probs: Any,
    run: str | Path,
) -> None:
    """Give each ranked direction, and the reference, the smallest edit size (at most the
    training alpha) that makes held-out validation cells of the other classes look like the
    target class to the classifier; in place.

    By default (``cfg.flip_target`` None) the edit must make the classifier call as many source
    cells the target as it calls real target cells the target (its recall on the target class's
    validation images): an edit the size of the difference between the classes, as the
    classifier sees it, so that the features it changes can be compared with the real class
    gap. With ``cfg.flip_target`` set, the edit must flip that share of the source cells.
    """
    # validation cells: ranking and evaluation use the test split, so the edit size is never
    # tuned on the images it is scored on
    x, _, keys = source_split(plan, target, cfg.calibration_images, cfg.seed + 3, split="val")
    if cfg.flip_target is None:
        goal = target_recall(plan, target, probs)
        criterion = f"share called {plan.classes[target]} >= its recall on real ones"
    else:
        goal, criterion = float(cfg.flip_target), "flip rate"
    info(f"rank: calibrating alpha on {len(x)} validation cells ({criterion}: {goal:.2f})")
    steps = cfg.calibration_ddim_steps
    z, x_T = encode_cached(ae, run, x, keys, steps, cfg.batch_size)
    p0 = probs(ae.decode(z, x_T, steps=steps, batch_size=cfg.batch_size)).numpy()

    def flips(moved: torch.Tensor) -> float:
        p = probs(ae.decode(moved, x_T, steps=steps, batch_size=cfg.batch_size))
        if cfg.flip_target is None:
            return float((p.argmax(1) == target).float().mean())
        return float(effect(p0, p.numpy(), target)["flip_rate"])

    towards = editor.space.towards(target)
    jobs: list[tuple[dict[str, Any], Any]] = [
        (d, lambda a, k=int(d["direction"]), s=int(d["sign"]): flips(editor.edit(z, k, s, a)))
        for d in ranked
    ]
    jobs.append((reference, lambda a: flips(editor.edit_along(z, towards, a))))
    for entry, flip_at in jobs:
        with torch.no_grad():
            res = smallest_alpha(flip_at, alpha, goal, cfg.calibration_steps)
        entry["alpha"] = res["alpha"]
        entry["calibration"] = {
            "criterion": criterion,
            "goal": goal,
            "images": len(x),
            "reached": res["reached"],
            "trace": res["trace"],
        }


def target_recall(plan: DataPlan, target: int, probs: Any) -> float:
    """Share of the validation images of the target class that the classifier calls the target."""
    data = load_split(plan, "val")
    x = data.x[data.y == target]
    if len(x) == 0:
        raise DiffexError(
            f"the validation split has no {plan.classes[target]!r} images to calibrate against; "
            "pass --flip-target"
        )
    return float((probs(x).argmax(1) == target).float().mean())
