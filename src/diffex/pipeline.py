"""The whole pipeline on the built-in synthetic cells (``diffex demo``): presets, resumable
stages (a stage whose outputs exist for the same configuration is skipped) and a summary."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffex.data.sources import open_source
from diffex.data.spec import load_spec
from diffex.data.synth import generate
from diffex.errors import DiffexError
from diffex.evaluate.run import EvaluateConfig, evaluate_run
from diffex.explain.explain import ExplainConfig, explain_run
from diffex.explain.rank import RankConfig, rank_directions
from diffex.explain.support import past_frames
from diffex.io.atomic import read_json, write_json
from diffex.log import info, warn
from diffex.models.external import ExternalSpec
from diffex.report.html import build_report
from diffex.stages import STAGES, with_revision
from diffex.train.attach import AttachConfig, attach_classifier
from diffex.train.autoencoder import AutoencoderTrainConfig, train_autoencoder
from diffex.train.classifier import ClassifierTrainConfig, train_classifier
from diffex.train.directions import DirectionTrainConfig, train_directions
from diffex.train.resume import digest, file_digest


@dataclass
class DemoConfig:
    """Every stage's settings for one demo run."""

    n: int
    size: int
    classifier: ClassifierTrainConfig
    autoencoder: AutoencoderTrainConfig
    directions: DirectionTrainConfig
    rank: RankConfig
    explain: ExplainConfig
    evaluate: EvaluateConfig
    data: str | None = None
    external: ExternalSpec | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    #: What the settings are, for the summary: a preset's name and any options changed on it.
    preset: str = "custom"


#: A demo option: its flag, its value (None: not given), the stage configs it sets and the field.
Override = tuple[str, Any, tuple[str, ...], str]


def apply_overrides(cfg: DemoConfig, overrides: list[Override]) -> DemoConfig:
    """``cfg`` with every given option's field set in its stages' configs (none for an option
    that only names itself, such as ``--data``), and the preset's name extended with the flags,
    as in ``"fast with --span 0.999, --no-z-norm"``, so the summary says what ran."""
    named = []
    for flag, value, stages, field_name in overrides:
        if value is None:
            continue
        if isinstance(value, bool):
            named.append(flag if value else f"--no-{flag.removeprefix('--')}")
        else:
            named.append(f"{flag} {value}")
        cfg = replace(
            cfg, **{st: replace(getattr(cfg, st), **{field_name: value}) for st in stages}
        )
    if named:
        cfg = replace(cfg, preset=f"{cfg.preset} with {', '.join(named)}")
    return cfg


def demo_preset(name: str, seed: int = 0) -> DemoConfig:
    """``quick``: toy sizes for tests and CI (about a minute on 2 cores); ``default``: the CPU
    demo that shows the real effect, ``fast``'s networks with an autoencoder conditioned on the
    classifier's features, edits kept in the data's span, a decoded invariance penalty, one set
    of directions and the legibility rule (about 15 minutes on 2 cores; BENCHMARKS: "The
    default since 2026-12-08", "The readout on 64 cells, and OpenMP's wait policy");
    ``classic``: the default until 2026-12-08 (full-resolution autoencoder, one-step
    directions); ``fast``: ``classic`` on the patched autoencoder (``cpu64p``) and a stride-2
    classifier stem, 15 to 17.5 minutes on 2 CPU cores, whose top directions also dimmed the
    stain on the half of the sweep away from the target on seeds 0 to 2 (BENCHMARKS: "Patched
    networks")."""
    if name == "quick":
        return DemoConfig(
            n=240,
            size=32,
            classifier=ClassifierTrainConfig(
                image_size=32, preset="tiny", epochs=4, batch_size=32, seed=seed
            ),
            autoencoder=AutoencoderTrainConfig(
                preset="tiny",
                steps=120,
                batch_size=16,
                lr=2e-3,
                warmup_steps=10,
                sample_every=60,
                eval_images=8,
                ddim_steps=10,
                consistency_start=40,
                consistency_ramp=20,
                seed=seed,
            ),
            directions=DirectionTrainConfig(
                k=3, steps=15, batch_size=4, eval_images=8, hidden=32, seed=seed
            ),
            rank=RankConfig(m=2, n_images=12, ddim_steps=8, seed=seed),
            explain=ExplainConfig(n_cells=4, n_strip=3, n_alphas=5, ddim_steps=8, seed=seed),
            evaluate=EvaluateConfig(
                n_images=8,
                ddim_steps=8,
                cout_steps=10,
                n_real=16,
                imagenet_size=64,
                sensitivity_cells=32,
                seed=seed,
            ),
            preset="quick",
        )
    if name == "default":
        # Seeds 0, 1 and 2 pass the ground-truth checks (seed 2's actin edit at 1.89 class
        # gaps on the 64-cell readout), seed 3 does not (its top edit grows the cell with the
        # nucleus); "classic" failed seed 0 on the reference Xeon and took 38.8 minutes
        # (BENCHMARKS: "The readout on 64 cells, and OpenMP's wait policy", "The default since
        # 2026-12-08", "The decoded penalty's BatchNorm fix").
        base = demo_preset("fast", seed)
        return replace(
            base,
            # the round trip scored on 64 held-out images, as the evaluation scores it (128
            # cost 13 s more; the trained weights do not depend on it)
            autoencoder=replace(base.autoencoder, classifier_output="features", eval_images=64),
            # one set of directions: on seeds 0 to 3 the second restart changed the verdict of
            # none (seed 1 passes with either) and cost 6 minutes
            directions=replace(
                base.directions,
                restarts=1,
                alpha=3.5,
                steps=240,
                span=0.999,
                decoded_invariance=2.0,
                decoded_core=1.0,
                decoded_every=2,
            ),
            rank=replace(base.rank, legible_within=0.1),
            preset="default",
        )
    if name == "fast":
        base = demo_preset("classic", seed)
        return replace(
            base,
            classifier=replace(base.classifier, stem_stride=2),
            autoencoder=replace(base.autoencoder, preset="cpu64p"),
            preset="fast",
        )
    if name == "classic":
        return DemoConfig(
            n=3000,
            size=48,
            classifier=ClassifierTrainConfig(image_size=48, seed=seed),
            # Half the standalone command's 2000 steps, a higher peak learning rate, and the
            # consistency loss on a quarter of each batch: about 11 minutes on 2 cores instead
            # of 40 (README: "The demo's settings"). Round trips are scored with the 20 DDIM
            # steps the evaluation decodes with (the standalone command's 50 cost 2 minutes).
            autoencoder=AutoencoderTrainConfig(
                steps=1000,
                ddim_steps=20,
                lr=5e-4,
                warmup_steps=100,
                consistency_start=400,
                consistency_ramp=300,
                consistency_fraction=0.25,
                seed=seed,
            ),
            # alpha = 2.5 class gaps: at 1.5 the top direction flipped 0.39 of control cells
            # and at 2 about half, but seed 1 flipped 0.42 and recovered no factor; trained at
            # 2.5 it flips 0.80 and recovers actin and nucleus, and at 3 a nuisance factor
            # (cell area) moved (BENCHMARKS: "Edit size"). Calibration still shrinks each edit
            # to the smallest that matches the classifier's recall.
            # Invariance weight 0.4 (the command's default is 0.3): at 2.5 and 0.3 seed 2's
            # background moved with |rho| 0.304; at 0.5 the edits of seeds 0 and 1 got too weak
            # to recover a factor; at 0.4 seeds 0 to 2 pass (BENCHMARKS: "Invariance weight").
            # 120 steps and a ranking screened at 10 DDIM steps (the evaluation re-measures the
            # ranked edits at 20) save time: the demo took 19 to 38 minutes on 2-core EPYCs.
            directions=DirectionTrainConfig(alpha=2.5, steps=120, invariance=0.4, seed=seed),
            rank=RankConfig(ddim_steps=10, seed=seed),
            explain=ExplainConfig(seed=seed),
            evaluate=EvaluateConfig(seed=seed),
            preset="classic",
        )
    raise DiffexError(f"unknown demo preset {name!r}; choose quick, default, fast or classic")


def _stage_marker(out: Path, stage: str) -> Path:
    return out / ".stages" / f"{stage}.json"


#: Settings added after runs existed, with the value that reproduces what those runs did: a
#: classifier or autoencoder recorded without ``gain_sd`` trained without gain augmentation,
#: and a classifier without ``stem_stride`` used the network's size rule (None);
#: an autoencoder recorded without ``z_norm`` conditioned on raw z_sem, and without
#: ``attention`` used the preset's; a directions stage recorded without ``restarts`` trained
#: one set, in fp32, without ``signs`` or ``reverse`` at +alpha only, without ``span``
#: unconstrained, without ``hold_area`` holding no area, without ``t_edit_max`` at
#: t_edit only and without ``decoded_invariance`` without that penalty; rank, explain and
#: evaluate recorded without ``precision`` decoded in fp32, without ``gain_margin`` left the
#: UNet's z gains unbounded and without ``inversion_refine`` inverted plainly; rank recorded
#: without ``legible_within`` ranked by delta-p alone.
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {
    "classifier": {"gain_sd": 0.0, "stem_stride": None},
    "autoencoder": {
        "z_norm": False,
        "attention": None,
        "gain_sd": 0.0,
        "axis_invariance": 0.0,
        "axis_reach": 3.0,
    },
    "directions": {
        "restarts": 1,
        "precision": "fp32",
        "signs": "plus",
        "reverse": 0.0,
        "span": None,
        "hold_area": "off",
        "t_edit_max": None,
        "decoded_invariance": 0.0,
        "decoded_steps": 4,
        "decoded_images": 2,
        "decoded_core": 0.0,
        "decoded_every": 1,
    },
    **{
        stage: {"precision": "fp32", "gain_margin": None, "inversion_refine": 0}
        for stage in ("explain", "evaluate")
    },
    "rank": {"precision": "fp32", "gain_margin": None, "inversion_refine": 0, "legible_within": 0},
}


def _upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A stage marker's recorded configuration with the settings it predates filled in."""
    out = dict(config)
    for stage, legacy in LEGACY_SETTINGS.items():
        if isinstance(out.get(stage), dict):
            out[stage] = {**legacy, **out[stage]}
    return out


def _done(out: Path, stage: str, config: dict[str, Any]) -> bool:
    marker = _stage_marker(out, stage)
    return marker.is_file() and _upgrade(read_json(marker).get("config") or {}) == config


def run_demo(out: Path, cfg: DemoConfig, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) every stage into ``out``; returns the summary."""
    out = Path(out)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    if cfg.data is None:
        data = out / "data"
        synth_cfg: dict[str, Any] = {"n": cfg.n, "size": cfg.size, "seed": seed, "spec": "default"}
        if _done(out, "synth", synth_cfg) and (data / "factors.csv").is_file():
            info(f"demo: reusing synthetic data in {data}")
        else:
            t0 = time.perf_counter()
            generate(
                load_spec(None), data, n=cfg.n, seed=seed, size=cfg.size, fmt="png", overwrite=True
            )
            timings["synth"] = time.perf_counter() - t0
            write_json(
                _stage_marker(out, "synth"), {"config": synth_cfg, "seconds": timings["synth"]}
            )
    else:
        data = Path(cfg.data)
        synth_cfg = {"data": str(data.resolve()), "seed": seed, "files": _listing(data)}
    classifier_cfg: Any = cfg.classifier
    classify = lambda: train_classifier(data, out, cfg.classifier, device)  # noqa: E731
    if cfg.external is not None:
        spec = cfg.external
        attach = AttachConfig(image_size=cfg.classifier.image_size, seed=seed)
        classifier_cfg = {"external": spec.to_dict(), "attach": asdict(attach)}
        if spec.kind == "torchscript" and Path(spec.source).is_file():
            classifier_cfg["file"] = file_digest(spec.source)  # a changed file is a new model
        classify = lambda: attach_classifier(data, out, spec, attach, device)  # noqa: E731
    upstream = dict(synth_cfg)
    steps = {
        "classifier": (classifier_cfg, classify),
        "autoencoder": (cfg.autoencoder, lambda: train_autoencoder(out, cfg.autoencoder, device)),
        "directions": (cfg.directions, lambda: train_directions(out, cfg.directions, device)),
        "rank": (cfg.rank, lambda: rank_directions(out, cfg.rank, device)),
        "explain": (cfg.explain, lambda: explain_run(out, cfg.explain, device)),
        "evaluate": (cfg.evaluate, lambda: evaluate_run(out, cfg.evaluate, device)),
    }
    stale: list[str] = []  # stages after the last one run, left from another configuration
    for stage in STAGES:  # the one order; ``steps`` only maps each stage to its work
        stage_cfg, fn = steps[stage]
        upstream = {**upstream, stage: with_revision(stage, _settings(stage_cfg))}
        if stage not in cfg.stages:
            if _stage_marker(out, stage).is_file() and not _done(out, stage, upstream):
                stale.append(stage)
            continue
        if _done(out, stage, upstream):
            info(f"demo: {stage} already done for this configuration, skipping")
            results[stage] = read_json(_stage_marker(out, stage)).get("result", {})
            continue
        info(f"demo: {stage}")
        t0 = time.perf_counter()
        result = fn()
        timings[stage] = time.perf_counter() - t0
        results[stage] = _brief(stage, result)
        write_json(
            _stage_marker(out, stage),
            {
                "config": upstream,
                "result": results[stage],
                "seconds": timings[stage],
                "threads": torch.get_num_threads(),  # results can depend on it (README)
            },
        )
    summary = {"out": str(out.resolve()), "preset": cfg.preset, "timings": timings, **results}
    write_json(out / "demo_summary.json", summary)
    if stale:
        warn(
            f"demo: {', '.join(stale)} in {out} come from another configuration; no report "
            f"until they are rerun (run the demo without --until)"
        )
    else:
        summary["report"] = str(build_report(out).resolve())
    return summary


def _listing(data: Path) -> str:
    """Digest of a data set's files, labels, sizes and times: added, removed or rewritten
    images make every stage run again."""
    source = open_source(data)
    rows = []
    for r in source.records:
        st = r.path.stat()
        rows.append([str(r.path), r.label, r.group, st.st_size, st.st_mtime_ns])
    return digest(rows)


def _settings(stage_cfg: Any) -> dict[str, Any]:
    """A stage's settings as the resume marker records them."""
    return stage_cfg if isinstance(stage_cfg, dict) else asdict(stage_cfg)


def _brief(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the closing summary shows for each stage."""
    if stage == "classifier":
        split = result.get("test") or result.get("val") or {}
        return {
            "accuracy": split.get("accuracy"),
            "balanced_accuracy": split.get("balanced_accuracy"),
            "ece": split.get("ece"),
        }
    if stage == "autoencoder":
        return {
            k: {m: result[k][m] for m in ("psnr", "ssim", "agreement")}
            for k in ("roundtrip", "semantic_only")
        }
    if stage == "directions":
        return {
            "class_gap": result.get("class_gap"),
            "heldout_accuracy": result.get("final", {}).get("heldout_accuracy"),
        }
    if stage == "rank":
        return {
            "target_class": result["target_class"],
            "alpha": result["alpha"],
            "n_images": result["n_images"],
            "directions": result["directions"],
            "reference": result["reference"],
        }
    if stage == "explain":
        items = []
        for item in result.get("items", []):
            rows = [
                r
                for r in item.get("morphology", [])
                if r.get("fraction_of_gap") == r.get("fraction_of_gap")
            ]
            rows.sort(key=lambda r: -abs(r["fraction_of_gap"]))
            items.append(
                {
                    "name": item["name"],
                    "top_changes": [
                        {
                            "feature": r["feature"],
                            "pct_change": r["pct_change"],
                            "fraction_of_gap": r["fraction_of_gap"],
                            "rho_alpha": r.get("rho_alpha"),
                        }
                        for r in rows[:3]
                    ],
                    "imaging_drift": item.get("imaging_drift", []),
                    "past_data": past_frames(item.get("frame_checks")),
                }
            )
        return {"items": items}
    if stage == "evaluate":
        return dict(result.get("headline", {}))
    return {}
