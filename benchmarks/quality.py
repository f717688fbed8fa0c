"""Quality benchmark: the default demo for several seeds, with the ``paper`` direction objective,
the class-mean reference and the GCD baseline beside DiffEx's default, in BENCHMARKS.md.

    python benchmarks/quality.py --out runs/quality --seeds 0 1 2

Each seed's default run lives in OUT/seed<S>; the ``paper`` variant in OUT/seed<S>_paper reuses
that seed's data, classifier and autoencoder (only directions, rank, explain and evaluate run
again) and trains one set of directions, as published (restarts are DiffEx's own); GCD runs
into OUT/seed<S>/baselines/gcd. Rerunning skips finished stages, so an interrupted benchmark
resumes. The table between the ``quality`` markers of BENCHMARKS.md is
replaced; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffex.baselines.gcd import GCDConfig
from diffex.baselines.run import GCDRunConfig, gcd_run
from diffex.evaluate.run import COMPARE_METRICS, comparison, evaluate_run, finite_or_null
from diffex.explain.explain import explain_run
from diffex.io.atomic import read_json, write_atomic, write_json
from diffex.pipeline import demo_preset, run_demo
from diffex.report.html import build_report

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
UPSTREAM = ("synth", "classifier", "autoencoder")
STAGES = ("synth", "classifier", "autoencoder", "directions", "rank", "explain", "evaluate")

#: Shared rows (the run's classifier and autoencoder): (label, headline key, digits).
SHARED: tuple[tuple[str, str, int], ...] = (
    ("classifier accuracy (test)", "accuracy", 3),
    ("autoencoder PSNR (dB)", "psnr", 1),
    ("autoencoder SSIM", "ssim", 3),
    ("classifier agreement on reconstructions", "agreement", 3),
)
#: Digits per comparison metric (diffex.evaluate.run.COMPARE_METRICS gives the labels).
DIGITS = {
    "n_directions": 1,
    "top1_delta_p": 3,
    "top1_l1": 4,
    "kid_classifier": 3,
    "kid_imagenet": 3,
}
#: Column order of the side-by-side table.
COLUMNS = (
    "DiffEx (classifier objective)",
    "DiffEx (paper objective)",
    "class-mean reference",
    "GCD",
)
PAPER = "DiffEx (paper objective)"


def machine() -> str:
    """CPU model, cores and torch version (or the GPU), for the table's caption."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def link_upstream(src: Path, dst: Path) -> None:
    """Give ``dst`` the data, classifier and autoencoder of ``src`` (copies, data linked)."""
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / "data").exists():
        (dst / "data").symlink_to((src / "data").resolve(), target_is_directory=True)
    for name in ("data.json",):
        shutil.copy2(src / name, dst / name)
    for stage in ("classifier", "autoencoder"):
        if not (dst / stage).exists():
            shutil.copytree(src / stage, dst / stage)
    (dst / ".stages").mkdir(exist_ok=True)
    for stage in UPSTREAM:
        shutil.copy2(src / ".stages" / f"{stage}.json", dst / ".stages" / f"{stage}.json")


def run_gcd(run: Path, cfg: Any, device: torch.device, seed: int) -> None:
    """GCD on the run's models, explained and evaluated like DiffEx (skipped when done)."""
    marker = run / ".stages" / "gcd.json"
    if marker.is_file() and (run / "baselines" / "gcd" / "evaluation.json").is_file():
        return
    t0 = time.perf_counter()
    gcd_run(run, GCDRunConfig(search=GCDConfig(seed=seed), seed=seed), device)
    explain_run(run, replace(cfg.explain, reference=False), device, method="gcd")
    evaluate_run(run, cfg.evaluate, device, method="gcd")
    write_json(marker, {"seconds": time.perf_counter() - t0})


def refresh_comparison(run: Path, compare: dict[str, Path]) -> dict[str, Any]:
    """Recompute the side-by-side section of the run's evaluation.json (no new edits)."""
    ev = read_json(run / "evaluation.json")
    ev["comparison"] = finite_or_null(comparison(run, ev, compare))
    write_json(run / "evaluation.json", ev)
    return ev


def seconds(run: Path) -> dict[str, float]:
    out = {}
    for stage in (*STAGES, "gcd"):
        marker = run / ".stages" / f"{stage}.json"
        if marker.is_file():
            sec = read_json(marker).get("seconds")
            if sec is not None:
                out[stage] = float(sec)
    return out


def _stat(values: list[Any], digits: int) -> str:
    v = [float(x) for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _chosen(result: dict[str, Any], column: str) -> str:
    """Which of DiffEx's restarts was ranked, with each set's best delta-p ("-" elsewhere)."""
    r = result.get("restarts") or {}
    if column != COLUMNS[0] or not r:
        return "-"
    best = ", ".join(f"{x:.3f}" for x in r.get("best_mean_delta_p", []))
    return f"{r['chosen']} of {r['n']} ({best})"


def table(results: dict[int, dict[str, Any]], host: str, flags: str = "") -> str:
    """The markdown block for BENCHMARKS.md; ``flags`` are the options the run left out."""
    seeds = sorted(results)
    cols = [c for c in COLUMNS if any(c in results[s]["methods"] for s in seeds)]
    lines = [
        BEGIN,
        "## Quality: the default demo over seeds, DiffEx beside the paper's objective and GCD",
        "",
        f"Command: `python benchmarks/quality.py --seeds {' '.join(map(str, seeds))}{flags}`. "
        f"Machine: {host}. Mean ± sd over seeds {', '.join(map(str, seeds))}.",
        "Every column is scored by `diffex evaluate` on the same held-out cells, classifier and "
        "autoencoder. `DiffEx (classifier objective)`: DiffEx as shipped; `DiffEx (paper "
        "objective)`: the published contrastive loss, one set of directions as published (DiffEx "
        "trains 2 sets and ranks the one whose best edit moves the classifier most); "
        "`class-mean reference`: the supervised "
        "direction between class means; `GCD`: our reimplementation of Global Counterfactual "
        "Directions (one source image, 3 rounds of 96 perturbations, classifier-feature distance). "
        "Top-1 rows describe each method's top-ranked direction; ground truth covers all its "
        "ranked directions.",
        "",
        "Shared by every method (the run's classifier and autoencoder; fidelity on 64 test "
        "images, 20 DDIM steps):",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for label, key, digits in SHARED:
        lines.append(
            f"| {label} | {_stat([results[s]['headline'].get(key) for s in seeds], digits)} |"
        )
    lines += ["", "| measure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, label in COMPARE_METRICS.items():
        cells = [
            _stat([results[s]["methods"].get(c, {}).get(key) for s in seeds], DIGITS.get(key, 2))
            for c in cols
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per stage of the default run, and of GCD (search, explain, evaluate):",
        "",
    ]
    lines += ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---|" + "---|" * len(seeds)]
    for stage in (*STAGES, "gcd"):
        cells = [results[s]["seconds"].get(stage) for s in seeds]
        if any(c is not None for c in cells):
            lines.append(
                f"| {stage} | "
                + " | ".join(f"{c:.0f} s" if c is not None else "-" for c in cells)
                + " |"
            )
    sens = [results[s].get("sensitivity") or {} for s in seeds]
    factors = [f for f in sens[0] if all(f in x for x in sens)] if sens else []
    if factors:
        lines += [
            "",
            "The classifier's own response to each factor, without the autoencoder "
            "(`ground_truth.classifier_sensitivity`: the generator draws the same source cells "
            "again with one factor moved, a causal factor by its class gap, a nuisance factor by "
            "one sd):",
            "",
            "| factor | kind | delta-p(target) | flip rate |",
            "|---|---|---|---|",
        ]
        for f in factors:
            lines.append(
                f"| {f} | {sens[0][f]['kind']} | "
                f"{_stat([x[f].get('mean_delta_p') for x in sens], 3)} | "
                f"{_stat([x[f].get('flip_rate') for x in sens], 2)} |"
            )
    lines += ["", "Per seed:", ""]
    lines += [
        "| seed | method | set ranked | top-1 delta-p | top-1 flip | recovery | leakage "
        "| leakage, alpha >= 0 |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for c in cols:
            m = results[s]["methods"].get(c, {})
            lines.append(
                f"| {s} | {c} | {_chosen(results[s], c)} | {_stat([m.get('top1_delta_p')], 3)} | "
                f"{_stat([m.get('top1_flip_rate')], 2)} | {_stat([m.get('recovery')], 2)} | "
                f"{_stat([m.get('leakage')], 2)} | {_stat([m.get('leakage_forward')], 2)} |"
            )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_benchmarks(path: Path, block: str) -> None:
    """Replace the quality block of BENCHMARKS.md (or append it)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-paper", action="store_true", help="skip the paper objective")
    ap.add_argument("--no-gcd", action="store_true", help="skip the GCD baseline")
    ap.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        cfg = demo_preset("default", seed)
        run_demo(run, cfg, device, seed=seed)
        compare = {}
        if not args.no_paper:
            paper = args.out / f"seed{seed}_paper"
            link_upstream(run, paper)
            pcfg = replace(cfg, directions=replace(cfg.directions, objective="paper", restarts=1))
            run_demo(paper, pcfg, device, seed=seed)
            compare[PAPER] = paper
        if not args.no_gcd:
            run_gcd(run, cfg, device, seed)
        ev = refresh_comparison(run, compare)
        build_report(run)
        results[seed] = {
            "headline": ev["headline"],
            "methods": ev["comparison"]["methods"],
            "seconds": seconds(run),
            "restarts": read_json(run / "ranking.json").get("restarts"),
            "sensitivity": ((ev.get("ground_truth") or {}).get("classifier_sensitivity") or {}).get(
                "factors", {}
            ),
        }
        flags = "".join(
            f" --{k}" for k in ("no-paper", "no-gcd") if getattr(args, k.replace("-", "_"))
        )
        write_benchmarks(args.benchmarks, table(results, machine(), flags))
    print(args.benchmarks.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
