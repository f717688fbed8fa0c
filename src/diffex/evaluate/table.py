"""Terminal summary of an evaluation (rich tables)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from diffex.explain.guard import DRIFT_RHO


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return format(x, fmt) if isinstance(x, float) else str(x)


def evaluation_tables(result: dict[str, Any]) -> list[Table]:
    """Headline numbers, and one row per scored direction (the reference last)."""
    fid = result["fidelity"]
    head = Table(title=f"evaluation towards {result['target_class']} (alpha {result['alpha']:g})")
    head.add_column("measure")
    head.add_column("value", justify="right")
    h = result["headline"]
    head.add_row("classifier accuracy (test)", _f(h.get("accuracy")))
    head.add_row("round trip PSNR / SSIM", f"{_f(fid['psnr'], '.1f')} dB / {_f(fid['ssim'])}")
    head.add_row("classifier agreement / KL", f"{_f(fid['agreement'])} / {_f(fid['kl'], '.4f')}")
    morph = fid.get("morphology") or {}
    if morph:
        head.add_row(
            "round trip keeps each cell's measurement (r)",
            ", ".join(f"{k} {_f(v['r'], '.2f')}" for k, v in morph.items()),
        )
    suff = result["sufficiency"]
    if suff:
        head.add_row(
            "sufficiency (flip rate, top-1..M)", "  ".join(_f(r["flip_rate"], ".2f") for r in suff)
        )
    if "frame_flags" in result:
        flagged = {n: v for n, v in result["frame_flags"].items() if v}
        head.add_row(
            "sweep frames the artifact guard flags",
            "; ".join(f"{n}: {', '.join(v)}" for n, v in flagged.items()) or "none",
        )
    if "imaging_drift" in result:
        drifting = {n: v for n, v in result["imaging_drift"].items() if v}
        head.add_row(
            f"imaging measurements that follow alpha (|rho| >= {DRIFT_RHO})",
            "; ".join(f"{n}: {', '.join(v)}" for n, v in drifting.items()) or "none",
        )
    gt = result.get("ground_truth")
    if gt:
        found = [f for f, v in gt["factors"].items() if v["recovered"]]
        head.add_row(
            "ground truth recovery", f"{_f(gt['recovery'], '.2f')} ({', '.join(found) or 'none'})"
        )
        for key, label in (("", ""), ("_forward", ", towards the target only")):
            worst = gt.get(f"worst_leak{key}") or {}
            where = f" ({worst['factor']})" if worst else ""
            head.add_row(
                f"ground truth leakage (max nuisance |rho|{label})",
                f"{_f(gt.get(f'leakage{key}'), '.2f')}{where}",
            )
        sens = (gt.get("classifier_sensitivity") or {}).get("factors") or {}
        causal = [f for f, v in sens.items() if v["kind"] == "causal"]
        if causal:
            head.add_row(
                "classifier delta-p per class gap (generator)",
                ", ".join(f"{f} {_f(sens[f]['mean_delta_p'], '+.2f')}" for f in causal),
            )
        nuis = [f for f, v in sens.items() if v["kind"] == "nuisance"]
        if nuis:
            top = max(nuis, key=lambda f: abs(sens[f]["mean_delta_p"] or 0.0))
            head.add_row(
                "largest nuisance delta-p per sd (generator)",
                f"{top} {_f(sens[top]['mean_delta_p'], '+.2f')}",
            )
    rows = Table(title="per direction")
    for col in (
        "direction",
        "alpha",
        "delta-p",
        "flip",
        "L1",
        "COUT",
        "FID clf",
        "KID clf",
        "FID imgnet",
        "HF sd",
        "bg sd",
    ):
        rows.add_column(col, justify="left" if col == "direction" else "right")
    real = result["realism"]["sets"]
    for r in result["directions"]:
        rs = real.get(r["name"], {})
        rows.add_row(
            r["name"],
            _f(r.get("alpha"), ".2f"),
            _f(r["mean_delta_p"], "+.3f"),
            _f(r["flip_rate"], ".2f"),
            _f(r["proximity"]["l1"], ".4f"),
            _f(r["cout"], "+.2f"),
            _f(rs.get("classifier", {}).get("fid"), ".2f"),
            _f(rs.get("classifier", {}).get("kid", {}).get("mean"), ".3f"),
            _f(rs.get("imagenet", {}).get("fid"), ".2f"),
            _f(r["artifacts_sd"].get("high_frequency"), "+.1f"),
            _f(r["artifacts_sd"].get("background"), "+.1f"),
        )
    for name in ("real_source", "reconstruction"):
        rs = real.get(name, {})
        rows.add_row(
            f"({name.replace('_', ' ')})",
            "",
            "",
            "",
            "",
            "",
            _f(rs.get("classifier", {}).get("fid"), ".2f"),
            _f(rs.get("classifier", {}).get("kid", {}).get("mean"), ".3f"),
            _f(rs.get("imagenet", {}).get("fid"), ".2f"),
            "",
            "",
        )
    tables = [head, rows]
    comp = result.get("comparison") or {}
    methods = comp.get("methods") or {}
    if len(methods) > 1:
        side = Table(title="side by side (top-ranked direction of each method)")
        side.add_column("measure")
        for m in methods:
            side.add_column(m, justify="right")
        for key, label in (comp.get("metrics") or {}).items():
            side.add_row(label, *(_f((methods[m] or {}).get(key)) for m in methods))
        tables.append(side)
    return tables


def print_evaluation(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the tables to stdout (or ``console``)."""
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    for t in evaluation_tables(result):
        console.print(t)
