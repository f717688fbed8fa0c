"""Quality benchmark: the default demo for several seeds, with the ``paper`` direction objective
and the class-mean reference beside DiffEx's default, summarised in BENCHMARKS.md.

    python benchmarks/quality.py --out runs/quality --seeds 0 1 2

Each seed's default run lives in OUT/seed<S>; the ``paper`` variant in OUT/seed<S>_paper reuses
that seed's data, classifier and autoencoder (only directions, rank, explain and evaluate run
again). Rerunning skips finished stages, so an interrupted benchmark resumes. The table between
the ``quality`` markers of BENCHMARKS.md is replaced; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffex.io.atomic import read_json, write_atomic
from diffex.pipeline import demo_preset, run_demo

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
UPSTREAM = ("synth", "classifier", "autoencoder")
STAGES = ("synth", "classifier", "autoencoder", "directions", "rank", "explain", "evaluate")

#: (label, headline key of the method's own run, reference headline key, digits)
ROWS: tuple[tuple[str, str, str | None, int], ...] = (
    ("classifier accuracy (test)", "accuracy", "accuracy", 3),
    ("autoencoder PSNR (dB)", "psnr", "psnr", 1),
    ("autoencoder SSIM", "ssim", "ssim", 3),
    ("classifier agreement on reconstructions", "agreement", "agreement", 3),
    ("directions ranked (M)", "n_directions", None, 1),
    ("top-1 mean delta-p", "top1_delta_p", "reference_delta_p", 3),
    ("top-1 flip rate", "top1_flip_rate", "reference_flip_rate", 2),
    ("top-1 COUT", "top1_cout", "reference_cout", 2),
    ("sufficiency: flip rate of top-1..M together", "sufficiency_at_m", None, 2),
    ("ground truth recovery", "recovery", "reference_recovery", 2),
    ("ground truth leakage (max nuisance |rho|)", "leakage", "reference_leakage", 2),
    ("top-1 FID, classifier features", "top1_fid_classifier", "reference_fid_classifier", 2),
    ("top-1 KID, classifier features", "top1_kid_classifier", "reference_kid_classifier", 3),
    ("top-1 FID, ImageNet features", "top1_fid_imagenet", "reference_fid_imagenet", 2),
    ("top-1 KID, ImageNet features", "top1_kid_imagenet", "reference_kid_imagenet", 3),
)


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


def reference_numbers(ev: dict[str, Any]) -> dict[str, Any]:
    """The class-mean reference's numbers from a default run's evaluation."""
    head = dict(ev["headline"])
    ref = next((d for d in ev["directions"] if d["reference"]), {})
    sets = ev["realism"]["sets"].get(ref.get("name", ""), {})
    head["reference_cout"] = ref.get("cout")
    for space in ("classifier", "imagenet"):
        d = sets.get(space) or {}
        head[f"reference_fid_{space}"] = d.get("fid")
        head[f"reference_kid_{space}"] = (d.get("kid") or {}).get("mean")
    return head


def seconds(run: Path) -> dict[str, float]:
    out = {}
    for stage in STAGES:
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


def table(results: dict[int, dict[str, Any]], host: str) -> str:
    seeds = sorted(results)
    lines = [
        BEGIN,
        "## Quality: the default demo over seeds",
        "",
        f"Command: `python benchmarks/quality.py --seeds {' '.join(map(str, seeds))}`. "
        f"Machine: {host}. Mean ± sd over seeds {', '.join(map(str, seeds))}.",
        "`default`: DiffEx as shipped (directions trained through the classifier's features); "
        "`paper`: the published contrastive objective on the same data, classifier and "
        "autoencoder; `class-mean reference`: the supervised direction between class means.",
        "",
        "| measure | default | paper | class-mean reference |",
        "|---|---|---|---|",
    ]
    for label, key, ref_key, digits in ROWS:
        d = [results[s]["default"].get(key) for s in seeds]
        p = [results[s].get("paper", {}).get(key) for s in seeds]
        r = [results[s]["reference"].get(ref_key) for s in seeds] if ref_key else []
        lines.append(f"| {label} | {_stat(d, digits)} | {_stat(p, digits)} | {_stat(r, digits)} |")
    lines += ["", "Wall time per stage (default run; the paper variant reruns the last four):", ""]
    lines += ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---|" + "---|" * len(seeds)]
    for stage in STAGES:
        cells = [results[s]["seconds"].get(stage) for s in seeds]
        if any(c is not None for c in cells):
            lines.append(
                f"| {stage} | "
                + " | ".join(f"{c:.0f} s" if c is not None else "-" for c in cells)
                + " |"
            )
    lines += ["", "Per seed (default / paper):", ""]
    lines += ["| seed | top-1 flip | recovery | leakage | paper top-1 flip | paper recovery |"]
    lines += ["|---|---|---|---|---|---|"]
    for s in seeds:
        d, p = results[s]["default"], results[s].get("paper", {})
        lines.append(
            f"| {s} | {_stat([d.get('top1_flip_rate')], 2)} | {_stat([d.get('recovery')], 2)} | "
            f"{_stat([d.get('leakage')], 2)} | {_stat([p.get('top1_flip_rate')], 2)} | "
            f"{_stat([p.get('recovery')], 2)} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_benchmarks(path: Path, block: str) -> None:
    """Replace the quality block of BENCHMARKS.md (or append it)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-paper", action="store_true", help="skip the paper objective")
    ap.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        cfg = demo_preset("default", seed)
        run_demo(run, cfg, device, seed=seed)
        ev = read_json(run / "evaluation.json")
        results[seed] = {
            "default": ev["headline"],
            "reference": reference_numbers(ev),
            "seconds": seconds(run),
        }
        if not args.no_paper:
            paper = args.out / f"seed{seed}_paper"
            link_upstream(run, paper)
            pcfg = replace(cfg, directions=replace(cfg.directions, objective="paper"))
            run_demo(paper, pcfg, device, seed=seed)
            results[seed]["paper"] = read_json(paper / "evaluation.json")["headline"]
        write_benchmarks(args.benchmarks, table(results, machine()))
    print(args.benchmarks.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
