"""The quick demo runs the whole pipeline end to end, writes every file, and resumes."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from diffex.cli import main
from diffex.explain.guard import flagged_frames
from diffex.explain.support import past_frames
from diffex.io.atomic import read_json, write_json

FIGURES = (
    "strip.png",
    "sweep.gif",
    "probability.png",
    "difference.png",
    "channels.png",
    "morphology.png",
    "summary.json",
)


def test_quick_demo_writes_every_stage(demo_run: Path) -> None:
    out = demo_run
    for rel in (
        "data/factors.csv",
        "data/contact_sheet.png",
        "data.json",
        "classifier/model.safetensors",
        "classifier/metrics.json",
        "autoencoder/model.safetensors",
        "autoencoder/metrics.json",
        "autoencoder/reconstructions.png",
        "directions/model.safetensors",
        "directions/metrics.json",
        "directions/training_curve.png",
        "directions/training_curve_restart1.png",
        "ranking.json",
        "explanations/summary.json",
        "demo_summary.json",
        "report.html",
    ):
        assert (out / rel).is_file(), rel
    assert read_json(out / "demo_summary.json")["preset"] == "quick"
    for stage in ("classifier", "autoencoder", "directions", "rank", "explain", "evaluate"):
        marker = read_json(out / ".stages" / f"{stage}.json")
        assert isinstance(marker["threads"], int) and marker["threads"] >= 1, stage
    ranking = read_json(out / "ranking.json")
    for key in ("target_class", "alpha", "n_images", "directions", "reference", "all_pairs"):
        assert key in ranking
    assert ranking["target_class"] == "treated"
    # two restarts of K = 3 directions, two signs; the ranked directions are all of the set
    # whose best edit raises p(treated) most
    assert len(ranking["all_pairs"]) == 2 * 2 * 3
    sets = ranking["restarts"]
    assert (sets["n"], sets["k"]) == (2, 3)
    best = [
        max(
            p["mean_delta_p"]
            for p in ranking["all_pairs"]
            if p["restart"] == r and not p["artifact_flags"]
        )
        for r in range(2)
    ]
    assert sets["chosen"] == int(best[1] > best[0])
    # the margin is the paired difference of the two best edits: its mean is their gap
    if sets["runner_up"] is not None:
        assert sets["runner_up"] == 1 - sets["chosen"]
        gap = best[sets["chosen"]] - best[sets["runner_up"]]
        assert sets["margin"] == pytest.approx(gap, abs=1e-6)
        assert sets["close"] == (sets["margin"] < 2 * sets["margin_se"])
    # all_pairs holds float32 means, the choice float64 ones: equal to float32 precision
    assert sets["best_mean_delta_p"] == pytest.approx(best, abs=1e-6)
    # every pair is measured against its reconstruction: legibility is its clearest cell
    # measurement's consistency, and nothing the acquisition sets is among them
    for p in ranking["all_pairs"]:
        measured = p["measured"]
        assert measured and not set(measured) & {"background", "noise", "brightness"}
        top = max(m["consistency"] for m in measured.values())
        assert p["legibility"] == pytest.approx(top)
    for d in ranking["directions"]:
        assert d["direction"] // 3 == sets["chosen"]
    # every ranked edit and the reference are calibrated against the classifier's recall on real
    # treated cells: never above the ranking alpha, and reaching the goal whenever it says so
    for entry in [*ranking["directions"], ranking["reference"]]:
        cal = entry["calibration"]
        assert cal["criterion"].startswith("share called treated")
        assert 0 < cal["goal"] <= 1
        assert 0 < cal["images"] <= ranking["config"]["calibration_images"]
        assert 0 < entry["alpha"] <= ranking["alpha"]
        hits = [t["alpha"] for t in cal["trace"] if t["rate"] >= cal["goal"]]
        assert (min(hits) == entry["alpha"]) if cal["reached"] else not hits
    metrics = read_json(out / "directions" / "metrics.json")
    assert set(metrics["invariance_spread"]) == {
        "background",
        "centroid_x",
        "centroid_y",
        "nucleus_gain",
    }
    assert "invariance" in metrics["history"][-1]
    seeds = [r["seed"] for r in metrics["restarts"]]
    assert seeds[1] - seeds[0] == 100
    assert [r["directions"] for r in metrics["restarts"]] == [[0, 2], [3, 5]]
    summary = read_json(out / "explanations" / "summary.json")
    assert summary["ddim_steps"] == ranking["ddim_steps"]  # the readout measures the ranked edit
    names = [item["name"] for item in summary["items"]]
    assert len(names) == len(ranking["directions"]) + 1  # ranked + class-mean reference
    for name in names:
        for fig in FIGURES:
            path = out / "explanations" / name / fig
            assert path.is_file() and path.stat().st_size > 0, path
    evaluation = read_json(out / "evaluation.json")
    for item in summary["items"]:  # the artifact guard on every frame of every sweep
        checks = item["frame_checks"]
        assert [c["alpha"] for c in checks] == item["alphas"]
        zero = checks[len(checks) // 2]
        assert zero["alpha"] == 0 and zero["flags"] == []
        assert {"background", "noise", "high_frequency", "stain_gain"} <= set(zero["artifacts_sd"])
        assert item["past_data"] == [c["past_data"] for c in checks]
        assert all(0.0 <= share <= 1.0 for share in item["past_data"])
        assert zero["past_data"] < 0.5  # the unedited held-out cells lie within the data
        assert evaluation["frame_flags"][item["name"]] == flagged_frames(checks)
        assert evaluation["past_data"][item["name"]] == past_frames(checks)


def test_rerun_skips_finished_stages(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"  # a copy: other test processes read the shared demo meanwhile
    shutil.copytree(demo_run, run)
    before = (run / "autoencoder" / "model.safetensors").stat().st_mtime_ns
    assert main(["--device", "cpu", "demo", "--preset", "quick", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "reusing synthetic data" in err
    for stage in ("classifier", "autoencoder", "directions", "rank", "explain"):
        assert f"{stage} already done" in err
    assert (run / "autoencoder" / "model.safetensors").stat().st_mtime_ns == before


def test_ranking_is_deterministic(demo_run: Path, tmp_path: Path) -> None:
    """Same seed, same device: ranking.json comes out byte for byte the same."""

    run = tmp_path / "again"
    run.mkdir()
    shutil.copy(demo_run / "data.json", run / "data.json")
    for stage in ("classifier", "autoencoder", "directions"):
        shutil.copytree(demo_run / stage, run / stage)
    cfg = read_json(demo_run / "ranking.json")["config"]
    args = ["--m", str(cfg["m"]), "--n-images", str(cfg["n_images"])]
    args += ["--ddim-steps", str(cfg["ddim_steps"]), "--seed", str(cfg["seed"])]
    assert main(["--device", "cpu", "rank", "--run", str(run), *args]) == 0
    assert (run / "ranking.json").read_bytes() == (demo_run / "ranking.json").read_bytes()


def test_marker_from_before_restarts_means_one_set(tmp_path: Path) -> None:
    """A directions marker written before ``restarts`` and ``precision`` existed trained one set
    in fp32: it is done for ``restarts = 1``, fp32, and stale for 2 or for bf16 (or auto), in its
    own stage and in the stages after it."""
    from diffex.io.atomic import write_json
    from diffex.pipeline import _done

    old = {"seed": 0, "directions": {"k": 10, "alpha": 2.0}, "rank": {"m": 3}}
    write_json(tmp_path / ".stages" / "rank.json", {"config": old, "seconds": 1.0})
    now = {
        **old,
        "directions": {
            "k": 10,
            "alpha": 2.0,
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
        # rank's own legacy settings: fp32 decodes, unbounded gains, plain inversion, by
        # delta-p alone
        "rank": {
            "m": 3,
            "precision": "fp32",
            "gain_margin": None,
            "inversion_refine": 0,
            "legible_within": 0.0,
        },
    }
    assert _done(tmp_path, "rank", now)
    assert not _done(tmp_path, "rank", {**now, "directions": {**now["directions"], "restarts": 2}})
    for precision in ("bf16", "auto"):
        moved = {**now["directions"], "precision": precision}
        assert not _done(tmp_path, "rank", {**now, "directions": moved})
    later_settings = (
        {"signs": "both"},
        {"reverse": 1.0},
        {"span": 0.999},
        {"hold_area": "auto"},
        {"t_edit_max": 800},
        {"decoded_invariance": 1.0},
        {"decoded_invariance": 1.0, "decoded_core": 0.3},
        {"decoded_invariance": 1.0, "decoded_every": 2},
    )
    for later in later_settings:  # added after restarts
        assert not _done(tmp_path, "rank", {**now, "directions": {**now["directions"], **later}})
    assert not _done(tmp_path, "rank", {**now, "rank": {**now["rank"], "m": 4}})
    assert not _done(tmp_path, "rank", {**now, "rank": {**now["rank"], "legible_within": 0.1}})
    assert not _done(tmp_path, "explain", now)  # no marker


def test_directions_from_before_a_code_fix_are_retrained(tmp_path: Path) -> None:
    """Directions trained with the decoded penalty before its BatchNorm fix (a marker without
    the code revision) are stale, in their stage and the stages after it; directions without
    that penalty, which the fix did not change, are still done."""
    from diffex.io.atomic import write_json
    from diffex.pipeline import LEGACY_SETTINGS, _done
    from diffex.stages import code_revision, with_revision

    for decoded, stale in ((2.0, True), (0.0, False)):
        directions = {**LEGACY_SETTINGS["directions"], "k": 10, "decoded_invariance": decoded}
        old = {"seed": 0, "directions": directions, "rank": {**LEGACY_SETTINGS["rank"], "m": 3}}
        for stage in ("directions", "rank"):
            write_json(tmp_path / ".stages" / f"{stage}.json", {"config": old, "seconds": 1.0})
        now = {**old, "directions": with_revision("directions", old["directions"])}
        for stage in ("directions", "rank"):
            assert _done(tmp_path, stage, now) is not stale
    assert code_revision("directions", {"decoded_invariance": 2.0}) == 1
    assert code_revision("rank", {"decoded_invariance": 2.0}) == 0
    assert with_revision("directions", {"decoded_invariance": 0.0}) == {"decoded_invariance": 0.0}


def test_directions_checkpoint_fingerprint_has_the_code_revision(tmp_path: Path) -> None:
    """A directions training checkpoint is fingerprinted with the code revision, so a run
    interrupted before a fix is not continued by the fixed code."""
    from diffex.rundir import RunDir
    from diffex.train.directions import DirectionTrainConfig
    from diffex.train.resume import stage_resume

    def fingerprint(decoded: float) -> dict:
        cfg = DirectionTrainConfig(decoded_invariance=decoded)
        return stage_resume(RunDir(tmp_path), "directions", cfg, {}).fingerprint

    assert fingerprint(2.0)["config"]["code_revision"] == 1
    assert "code_revision" not in fingerprint(0.0)["config"]


def test_marker_from_before_stem_stride_means_the_size_rule(tmp_path: Path) -> None:
    """A classifier marker written before ``stem_stride`` existed used the network's size rule
    (None): done for None, stale (retrained) for an explicit stride such as 2."""
    from diffex.io.atomic import write_json
    from diffex.pipeline import _done

    old = {"seed": 0, "classifier": {"image_size": 48, "epochs": 20}}
    write_json(tmp_path / ".stages" / "classifier.json", {"config": old, "seconds": 1.0})
    now = {**old, "classifier": {**old["classifier"], "gain_sd": 0.0, "stem_stride": None}}
    assert _done(tmp_path, "classifier", now)
    assert not _done(
        tmp_path, "classifier", {**now, "classifier": {**now["classifier"], "stem_stride": 2}}
    )


def test_marker_from_before_z_norm_means_raw_z(tmp_path: Path) -> None:
    """An autoencoder marker written before ``z_norm`` (or the class-axis term) existed
    conditioned the UNet on raw z_sem without that term: done for both off, stale (retrained)
    for either on, in its stage and the ones after."""
    from diffex.io.atomic import write_json
    from diffex.pipeline import _done

    old = {"seed": 0, "autoencoder": {"steps": 1000}}
    now = {
        "steps": 1000,
        "z_norm": False,
        "attention": None,
        "gain_sd": 0.0,
        "axis_invariance": 0.0,
        "axis_reach": 3.0,
    }
    for stage in ("autoencoder", "directions"):
        write_json(tmp_path / ".stages" / f"{stage}.json", {"config": old, "seconds": 1.0})
        assert _done(tmp_path, stage, {**old, "autoencoder": now})
        changes = (
            {"z_norm": True},
            {"attention": []},
            {"gain_sd": 0.15},
            {"axis_invariance": 0.03},
        )
        for moved in changes:
            assert not _done(tmp_path, stage, {**old, "autoencoder": {**now, **moved}})
    # a classifier marker from before gain augmentation trained without it
    old_clf = {"seed": 0, "classifier": {"epochs": 20}}
    write_json(tmp_path / ".stages" / "classifier.json", {"config": old_clf, "seconds": 1.0})
    clf_now = {"epochs": 20, "gain_sd": 0.0, "stem_stride": None}
    assert _done(tmp_path, "classifier", {"seed": 0, "classifier": clf_now})
    assert not _done(
        tmp_path, "classifier", {"seed": 0, "classifier": {**clf_now, "gain_sd": 0.15}}
    )


def test_marker_from_before_decode_precision_means_fp32(tmp_path: Path) -> None:
    """Rank, explain and evaluate markers written before their ``precision``, ``gain_margin``
    and ``inversion_refine`` existed decoded in fp32 with unbounded gains from plain inversions:
    done for that, stale for bf16, auto, a margin or a refined inversion."""
    from diffex.io.atomic import write_json
    from diffex.pipeline import _done

    old = {"seed": 0, "rank": {"m": 3}, "explain": {"n_cells": 4}, "evaluate": {"n_images": 8}}
    write_json(tmp_path / ".stages" / "evaluate.json", {"config": old, "seconds": 1.0})
    for stage in ("rank", "explain", "evaluate"):
        now = {
            **old,
            **{
                s: {**old[s], "precision": "fp32", "gain_margin": None, "inversion_refine": 0}
                for s in ("rank", "explain", "evaluate")
            },
        }
        now["rank"]["legible_within"] = 0.0
        assert _done(tmp_path, "evaluate", now)
        for setting in (
            {"precision": "bf16"},
            {"precision": "auto"},
            {"gain_margin": 0.1},
            {"inversion_refine": 10},
        ):
            moved = {**now, stage: {**now[stage], **setting}}
            assert not _done(tmp_path, "evaluate", moved), (stage, setting)


def test_decode_precision_is_recorded_and_validated(demo_run: Path) -> None:
    """The stages record the precision their decodes ran in (``auto`` resolved for this
    machine); a precision other than auto, fp32 or bf16 is a one-line error."""
    from diffex.errors import DiffexError
    from diffex.evaluate.run import EvaluateConfig
    from diffex.explain.explain import ExplainConfig
    from diffex.explain.rank import RankConfig
    from diffex.runtime import resolve_precision
    from diffex.train.autoencoder import load_autoencoder

    resolved = resolve_precision("auto", "cpu")
    assert read_json(demo_run / "ranking.json")["precision"] == resolved
    assert read_json(demo_run / "explanations" / "summary.json")["precision"] == resolved
    assert read_json(demo_run / "evaluation.json")["precision"] == resolved
    for precision, bf16 in (("fp32", False), ("bf16", True), ("auto", resolved == "bf16")):
        assert load_autoencoder(demo_run, "cpu", precision=precision).decode_bf16 is bf16
    for config in (RankConfig, ExplainConfig, EvaluateConfig):
        with pytest.raises(DiffexError, match="precision must be auto, fp32 or bf16"):
            config(precision="fp16")


def test_inversion_refinement_is_validated(tmp_path: Path, capsys) -> None:
    """A refinement that is not an integer >= 0 is a one-line error: a DiffexError from every
    stage's settings, and exit code 2 from every command that takes the flag."""
    from diffex.baselines.run import GCDRunConfig
    from diffex.errors import DiffexError
    from diffex.evaluate.run import EvaluateConfig
    from diffex.explain.explain import ExplainConfig
    from diffex.explain.rank import RankConfig

    for config in (RankConfig, ExplainConfig, EvaluateConfig, GCDRunConfig):
        for bad in (-1, 1.5):
            with pytest.raises(DiffexError, match="inversion_refine must be an integer >= 0"):
                config(inversion_refine=bad)
    for command in (["rank"], ["explain"], ["evaluate"], ["baseline", "gcd"]):
        args = ["--device", "cpu", *command, "--run", str(tmp_path), "--inversion-refine", "-1"]
        assert main(args) == 2
        assert "--inversion-refine" in capsys.readouterr().err


def test_explanations_record_their_imaging_drift(demo_run: Path) -> None:
    """Each explanation records which imaging measurements follow alpha along its sweep, as
    :func:`diffex.explain.guard.imaging_drift` reads them off its own morphology rows, and the
    evaluation repeats them."""
    from diffex.explain.guard import imaging_drift

    items = read_json(demo_run / "explanations" / "summary.json")["items"]
    evaluation = read_json(demo_run / "evaluation.json")
    assert items and evaluation["schema_version"] >= 5
    for item in items:
        assert item["imaging_drift"] == imaging_drift(item["morphology"])
        assert evaluation["imaging_drift"][item["name"]] == item["imaging_drift"]
        own = read_json(demo_run / "explanations" / item["name"] / "summary.json")
        assert own["imaging_drift"] == item["imaging_drift"]
    shown = read_json(demo_run / "demo_summary.json")["explain"]["items"]
    assert {i["name"]: i["imaging_drift"] for i in shown} == {
        i["name"]: i["imaging_drift"] for i in items
    }
    assert {i["name"]: i["past_data"] for i in shown} == {
        i["name"]: past_frames(i["frame_checks"]) for i in items
    }


def test_demo_summary_prints_imaging_drift_only_where_there_is_one(capsys) -> None:
    """The closing summary names the preset first, then the imaging measurements that follow
    alpha and the frames past the training data under the direction they belong to, and prints
    nothing for a direction without any."""
    from diffex.cli import _print_demo

    change = {"feature": "nucleus_area", "pct_change": 27.0, "fraction_of_gap": 0.9}
    drift = ["brightness rho +0.36 (towards the target -0.11)"]
    past = ["alpha -2.5 (92 % of cells)"]
    items = [
        {"name": "rank1_dir0+", "top_changes": [change], "imaging_drift": drift, "past_data": past},
        {"name": "rank2_dir3+", "top_changes": [change], "imaging_drift": []},
    ]
    _print_demo({"out": "runs/demo", "preset": "fast", "explain": {"items": items}})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "preset: fast"
    at = out.index("  rank1_dir0+: nucleus_area +27 % (0.9 of gap)")
    assert out[at + 1] == f"    imaging follows alpha: {drift[0]}"
    assert out[at + 2] == f"    past the training data: {past[0]}"
    assert sum("imaging follows alpha" in line for line in out) == 1
    assert sum("past the training data" in line for line in out) == 1


def test_demo_options_reach_the_stage_configs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``demo --z-norm --axis-invariance W --gain-margin M`` change the autoencoder's and the
    decoding stages' settings of the preset and nothing else, ``--span``, ``--hold-area``,
    ``--t-edit-max``, ``--decoded-invariance``, ``--decoded-core``, ``--decoded-every``,
    ``--directions-steps`` and ``--alpha`` the directions stage's,
    ``--classifier-output`` the autoencoder's; without them the preset runs."""
    import diffex.pipeline as pipeline

    seen: list[pipeline.DemoConfig] = []

    def fake_run(out: Path, cfg: pipeline.DemoConfig, device: object, seed: int = 0) -> dict:
        seen.append(cfg)
        return {"out": str(out)}

    monkeypatch.setattr(pipeline, "run_demo", fake_run)
    base = ["--device", "cpu", "demo", "--preset", "quick", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--z-norm", "--axis-invariance", "0.03", "--gain-margin", "0.1"]) == 0
    assert main([*base, "--span", "0.99", "--hold-area", "on", "--no-z-norm"]) == 0
    assert main([*base, "--classifier-output", "features"]) == 0
    assert main([*base, "--inversion-refine", "0"]) == 0
    args = ["--decoded-invariance", "1.0", "--alpha", "3.5", "--t-edit-max", "800"]
    args += ["--decoded-core", "0.3", "--decoded-every", "2", "--directions-steps", "7"]
    assert main([*base, *args]) == 0
    plain, moved, held, featured, plain_inversion, decoded = seen
    assert plain == pipeline.demo_preset("quick")
    assert plain.autoencoder.axis_invariance == 0.0 and not plain.autoencoder.z_norm
    assert moved.autoencoder.axis_invariance == 0.03 and moved.autoencoder.z_norm
    assert all(getattr(moved, s).gain_margin == 0.1 for s in ("rank", "explain", "evaluate"))
    assert moved.directions == plain.directions and moved.classifier == plain.classifier
    # the summary names the preset and what was changed on it
    assert plain.preset == "quick"
    assert moved.preset == "quick with --axis-invariance 0.03, --gain-margin 0.1, --z-norm"
    assert held.directions == replace(plain.directions, span=0.99, hold_area="on")
    assert held.autoencoder == plain.autoencoder and held.rank == plain.rank
    assert held.preset == "quick with --span 0.99, --hold-area on, --no-z-norm"
    assert featured.autoencoder == replace(plain.autoencoder, classifier_output="features")
    assert featured.directions == plain.directions
    assert all(getattr(plain, s).inversion_refine > 0 for s in ("rank", "explain", "evaluate"))
    stages = ("rank", "explain", "evaluate")
    assert all(getattr(plain_inversion, s).inversion_refine == 0 for s in stages)
    assert plain_inversion.autoencoder == plain.autoencoder
    assert plain_inversion.preset == "quick with --inversion-refine 0"
    assert decoded.directions == replace(
        plain.directions,
        decoded_invariance=1.0,
        alpha=3.5,
        t_edit_max=800,
        decoded_core=0.3,
        decoded_every=2,
        steps=7,
    )
    assert decoded.autoencoder == plain.autoencoder and decoded.rank == plain.rank
    assert decoded.preset == (
        "quick with --t-edit-max 800, --alpha 3.5, --decoded-invariance 1.0, --decoded-core 0.3, "
        "--decoded-every 2, --directions-steps 7"
    )
    assert main([*base, "--inversion-refine", "-1"]) == 2
    assert main([*base, "--decoded-invariance", "-1"]) == 2
    assert main([*base, "--decoded-core", "0.3"]) == 2  # without --decoded-invariance
    assert main([*base, "--decoded-every", "0"]) == 2
    assert main([*base, "--directions-steps", "0"]) == 2
    assert main([*base, "--alpha", "0"]) == 2
    assert main([*base, "--classifier-output", "softmax"]) == 2
    assert main([*base, "--axis-invariance", "-1"]) == 2


def test_fast_preset_is_classic_on_patched_networks() -> None:
    """``--preset fast`` changes exactly two settings of ``classic``: the patched autoencoder
    and the classifier's stride-2 stem; the seed reaches every stage as in ``classic``, and
    an unknown preset fails with one line naming the choices."""
    from dataclasses import replace

    from diffex.errors import DiffexError
    from diffex.pipeline import demo_preset

    fast, classic = demo_preset("fast", 3), demo_preset("classic", 3)
    assert (fast.autoencoder.preset, fast.classifier.stem_stride) == ("cpu64p", 2)
    assert (classic.autoencoder.preset, classic.classifier.stem_stride) == ("cpu64", None)
    assert fast.classifier == replace(classic.classifier, stem_stride=2)
    assert fast.autoencoder == replace(classic.autoencoder, preset="cpu64p")
    assert (fast.preset, classic.preset) == ("fast", "classic")
    same = replace(fast, classifier=classic.classifier, autoencoder=classic.autoencoder)
    assert replace(same, preset="classic") == classic
    with pytest.raises(DiffexError, match="quick, default, fast or classic"):
        demo_preset("slow")


def test_default_preset_is_fast_with_the_measured_settings() -> None:
    """The default preset is ``fast`` with exactly the settings measured to pass seeds 0 and 1
    (BENCHMARKS): features conditioning, edits in the data's span at alpha 3.5 over 240 steps,
    the decoded penalty with the nucleus core every second step, one set of directions, and the
    legibility rule."""
    from dataclasses import replace

    from diffex.pipeline import demo_preset

    default, fast = demo_preset("default", 5), demo_preset("fast", 5)
    assert default.preset == "default" and default.directions.seed == 5
    assert default.autoencoder == replace(
        fast.autoencoder, classifier_output="features", eval_images=64
    )
    moved = dict(
        restarts=1,
        alpha=3.5,
        steps=240,
        span=0.999,
        decoded_invariance=2.0,
        decoded_core=1.0,
        decoded_every=2,
    )
    assert default.directions == replace(fast.directions, **moved)
    assert default.rank == replace(fast.rank, legible_within=0.1)
    assert (default.classifier, default.explain, default.evaluate) == (
        fast.classifier,
        fast.explain,
        fast.evaluate,
    )


def test_explain_unranked_pairs(demo_run: Path, tmp_path: Path, capsys) -> None:
    """``explain --unranked K+`` renders a learned pair the ranking did not rank into its own
    folder, listed apart from the ranked items; a malformed, out-of-range or already ranked
    pair is a one-line error (exit 2) before anything is computed."""
    from diffex.errors import DiffexError
    from diffex.explain.methods import load_direction_set, parse_pair

    with pytest.raises(DiffexError, match="DiffEx's own learned ones, not gcd's"):
        load_direction_set(demo_run, "gcd", unranked=[(0, 1)])

    assert parse_pair("8-") == (8, -1) and parse_pair(" 12+") == (12, 1)
    for bad in ("8", "+", "x-", "-3-", "8+-"):
        with pytest.raises(DiffexError, match="expected a direction and sign"):
            parse_pair(bad)
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    ranking = read_json(run / "ranking.json")
    if not ranking["directions"]:  # the toy run may rank none: rank its best pair by hand
        best = max(ranking["all_pairs"], key=lambda p: p["mean_delta_p"])
        ranking["directions"] = [{**best, "rank": 1}]
        write_json(run / "ranking.json", ranking)
    ranked = {(d["direction"], d["sign"]) for d in ranking["directions"]}
    pair = next(
        (p["direction"], p["sign"])
        for p in ranking["all_pairs"]
        if (p["direction"], p["sign"]) not in ranked
    )
    k_total = read_json(run / "directions" / "config.json")["model"]["k"]
    first = ranking["directions"][0]
    base = ["--device", "cpu", "explain", "--run", str(run), "--n-cells", "4", "--no-measure"]
    before = {p.name for p in (run / "explanations").iterdir()}
    for bad, message in (
        ("x+", "--unranked 'x+'"),
        (f"{k_total}+", f"directions 0 to {k_total - 1}"),
        (f"{first['direction']}{'+' if first['sign'] > 0 else '-'}", "already ranked (1)"),
    ):
        assert main([*base, "--unranked", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--ddim-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "ddim_steps must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert {p.name for p in (run / "explanations").iterdir()} == before  # nothing touched
    name = f"unranked_dir{pair[0]}{'+' if pair[1] > 0 else '-'}"
    assert main([*base, "--unranked", name[len("unranked_dir") :]]) == 0
    summary = read_json(run / "explanations" / "summary.json")
    assert [i["name"] for i in summary["unranked"]] == [name]
    assert name not in {i["name"] for i in summary["items"]}
    assert len(summary["items"]) == len(ranking["directions"]) + 1  # and the reference
    own = read_json(run / "explanations" / name / "summary.json")
    assert own["alphas"][-1] == pytest.approx(ranking["alpha"])
    assert own["label"].startswith("not ranked")
    for figure in FIGURES[:-2]:
        assert (run / "explanations" / name / figure).is_file()


def test_rank_legible_within_picks_the_most_legible_edit_near_the_best(
    demo_run: Path, tmp_path: Path
) -> None:
    """``rank --legible-within`` ranks first the most legible edit among those within that
    share of the best delta-p over every restart, from the restart that holds it."""
    from diffex.cli import main

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    args = ["--device", "cpu", "rank", "--run", str(run), "--m", "2", "--n-images", "12"]
    assert main([*args, "--ddim-steps", "8", "--no-calibrate", "--legible-within", "0.5"]) == 0
    ranking = read_json(run / "ranking.json")
    assert ranking["config"]["legible_within"] == 0.5
    sets = ranking["restarts"]
    assert "most legible" in sets["rule"] and sets["margin"] is None
    pairs = [p for p in ranking["all_pairs"] if not p["artifact_flags"]]
    best = max(p["mean_delta_p"] for p in pairs)
    near = [p for p in pairs if p["mean_delta_p"] >= best - 0.5 * abs(best)]
    pick = max(near, key=lambda p: (p["legibility"], p["mean_delta_p"]))
    assert sets["chosen"] == pick["restart"]
    if ranking["directions"]:  # the toy run may rank none (threshold)
        first = ranking["directions"][0]
        assert (first["direction"], first["sign"]) == (pick["direction"], pick["sign"])
