"""``diffex report``: one self-contained HTML file (images embedded) for a run.

Every section reads what its stage wrote; a section whose inputs are missing is left out.
Everything that comes from user data is escaped by jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import math
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2

from diffex import __version__
from diffex.errors import DiffexError
from diffex.explain.guard import DRIFT_RHO, flagged_frames, imaging_drift
from diffex.explain.support import past_frames
from diffex.io.atomic import read_json, write_atomic

TEMPLATE = "report.html.j2"
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def data_uri(path: Path) -> str | None:
    """The file as a base64 ``data:`` URI (None when it does not exist)."""
    if not path.is_file():
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _ids(values: list[int]) -> str:
    """Direction indices as "8, 0"."""
    return ", ".join(str(int(v)) for v in values)


def _fmt(x: Any, digits: int = 3) -> str:
    """Numbers for people: fixed digits, blank for missing or NaN."""
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, int):
        return str(x)
    if _finite(x):
        return f"{x:.{digits}f}"
    return "" if not isinstance(x, str) else x


def _versions() -> dict[str, str]:
    out = {"diffex": __version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "scikit-image", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    out["platform"] = f"{platform.system()} {platform.machine()}"
    return out


def _data_section(root: Path) -> dict[str, Any] | None:
    plan = _json(root / "data.json")
    if not plan:
        return None
    classes = plan.get("classes", [])
    counts = {
        split: [
            sum(1 for y in plan["labels"].get(split, []) if y == i) for i in range(len(classes))
        ]
        for split in ("train", "val", "test")
        if split in plan.get("labels", {})
    }
    return {
        "classes": classes,
        "counts": counts,
        "image_size": plan.get("image_size"),
        "channels": list(
            zip(plan.get("channel_names", []), plan.get("channel_colors", []), strict=False)
        ),
        "normalization": plan.get("normalization", {}).get("mode"),
        "seed": plan.get("seed"),
    }


def _classifier_section(root: Path) -> dict[str, Any] | None:
    metrics = _json(root / "classifier" / "metrics.json")
    if not metrics:
        return None
    rows = []
    for split in ("val", "test"):
        m = metrics.get(split)
        if m:
            rows.append(
                {
                    "split": split,
                    "accuracy": _fmt(m.get("accuracy")),
                    "balanced": _fmt(m.get("balanced_accuracy")),
                    "ece": _fmt(m.get("ece")),
                    "auc": ", ".join(f"{k} {_fmt(v)}" for k, v in (m.get("roc_auc") or {}).items())
                    if isinstance(m.get("roc_auc"), dict)
                    else _fmt(m.get("roc_auc")),
                }
            )
    cfg = _json(root / "classifier" / "config.json") or {}
    return {
        "rows": rows,
        "temperature": _fmt(metrics.get("temperature")),
        "confusion": data_uri(root / "classifier" / "confusion_reliability.png"),
        "curve": data_uri(root / "classifier" / "training_curve.png"),
        "config": cfg.get("train") or cfg.get("external") or {},
        "external": cfg.get("external"),
    }


def _autoencoder_section(root: Path) -> dict[str, Any] | None:
    metrics = _json(root / "autoencoder" / "metrics.json")
    if not metrics:
        return None
    rows = []
    for key, label in (
        ("roundtrip", "decode(encode(x))"),
        ("semantic_only", "decode from z alone"),
    ):
        m = metrics.get(key)
        if m:
            rows.append(
                {
                    "what": label,
                    "psnr": _fmt(m.get("psnr"), 1),
                    "ssim": _fmt(m.get("ssim")),
                    "agreement": _fmt(m.get("agreement")),
                    "kl": _fmt(m.get("kl"), 4),
                }
            )
    cfg = _json(root / "autoencoder" / "config.json") or {}
    return {
        "rows": rows,
        "grid": data_uri(root / "autoencoder" / "reconstructions.png"),
        "curve": data_uri(root / "autoencoder" / "training_curve.png"),
        "steps": metrics.get("steps"),
        "images_seen": metrics.get("images_seen"),
        "config": cfg.get("train") or cfg.get("external") or {},
        "external": cfg.get("external"),
    }


def _morphology_rows(entry: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for r in entry.get("morphology", []):
        pct = r.get("pct_change")
        rows.append(
            {
                "feature": r.get("feature", ""),
                "before": _fmt(r.get("mean_0")),
                "after": _fmt(r.get("mean_alpha")),
                "pct": f"{pct:+.1f} %" if _finite(pct) else "",
                "ci": (
                    f"[{r['pct_ci_low']:+.1f}, {r['pct_ci_high']:+.1f}] %"
                    if _finite(r.get("pct_ci_low")) and _finite(r.get("pct_ci_high"))
                    else ""
                ),
                "gap": _fmt(r.get("fraction_of_gap"), 2),
                "rho": _fmt(r.get("rho_alpha"), 2),
                "rho_forward": _fmt(r.get("rho_forward"), 2),
            }
        )
    return rows


def _top_changes(entry: dict[str, Any], n: int = 3) -> str:
    """The ``n`` measurements that change most from alpha 0 to the shown alpha, in units of
    each one's natural sd (``change_sd``): the same change as the % shown beside it."""
    rows = [
        r
        for r in entry.get("morphology", [])
        if _finite(r.get("pct_change")) and _finite(r.get("change_sd"))
    ]
    rows.sort(key=lambda r: -abs(r["change_sd"]))
    return ", ".join(f"{r['feature']} {r['pct_change']:+.0f} %" for r in rows[:n])


def _directions_section(root: Path) -> dict[str, Any] | None:
    ranking = _json(root / "ranking.json")
    if not ranking:
        return None
    summary = _json(root / "explanations" / "summary.json") or {"items": []}
    entries = {e["name"]: e for e in summary.get("items", [])}
    explained = []
    for name, entry in entries.items():
        folder = root / entry.get("folder", f"explanations/{name}")
        frames = entry.get("frames") or {}
        frame_uris = [
            data_uri(folder / frames.get("folder", "frames") / f) for f in frames.get("files", [])
        ]
        explained.append(
            {
                "name": name,
                "label": entry.get("label", name),
                "frames": [u for u in frame_uris if u],
                "alphas": frames.get("alphas", []),
                "p": frames.get("p", []),
                "probability": data_uri(folder / "probability.png"),
                "difference": data_uri(folder / "difference.png"),
                "channels": data_uri(folder / "channels.png"),
                "strip": data_uri(folder / "strip.png"),
                "morphology": _morphology_rows(entry),
                "frame_flags": flagged_frames(entry.get("frame_checks")),
                "past_data": past_frames(entry.get("frame_checks")),
                "imaging_drift": imaging_drift(entry.get("morphology", [])),
            }
        )
    by_rank = {
        f"rank{d['rank']}_dir{d['direction']}{'+' if d['sign'] > 0 else '-'}": d
        for d in ranking.get("directions", [])
    }
    table = []
    for name, d in by_rank.items():
        table.append(
            {
                "rank": d["rank"],
                "direction": f"{d['direction']} ({'+' if d['sign'] > 0 else '−'})"
                + (f"; same edit: {_ids(d['duplicates'])}" if d.get("duplicates") else ""),
                "delta_p": _fmt(d.get("mean_delta_p")),
                "flip": _fmt(d.get("flip_rate"), 2),
                "explained": d.get("n_explained", ""),
                "alpha": _fmt(d.get("alpha", ranking.get("alpha")), 2),
                "flags": ", ".join(d.get("artifact_flags") or []),
                "changes": _top_changes(entries.get(name, {})),
            }
        )
    ref = ranking.get("reference") or {}
    reference = None
    if ref:
        reference = {
            "delta_p": _fmt(ref.get("mean_delta_p")),
            "flip": _fmt(ref.get("flip_rate"), 2),
            "alpha": _fmt(ref.get("alpha", ranking.get("alpha")), 2),
            "changes": _top_changes(entries.get("reference_class_mean", {})),
        }
    flagged = [p for p in ranking.get("all_pairs", []) if p.get("artifact_flags")]
    return {
        "target": ranking.get("target_class"),
        "alpha": ranking.get("alpha"),
        "n_images": ranking.get("n_images"),
        "table": table,
        "reference": reference,
        "explained": explained,
        "n_flagged": len(flagged),
        "unedited_p": _fmt(ranking.get("unedited_mean_p_target")),
        "stop_reason": ranking.get("stop_reason", ""),
        "restarts": _restarts_line(ranking.get("restarts") or {}),
    }


def _restarts_line(sets: dict[str, Any]) -> str:
    """Which of several direction sets was ranked, and why (empty for a single set)."""
    if sets.get("n", 1) < 2:
        return ""
    best = ", ".join("none" if b is None else f"{b:+.3f}" for b in sets["best_mean_delta_p"])
    line = (
        f"Directions were trained {sets['n']} times from different random starts; the ranking "
        f"uses restart {sets['chosen']}, whose best edit raises p(target) most (each restart's "
        f"best edit: {best})."
    )
    if sets.get("margin") is not None:
        line += (
            f" Per cell, its best edit raises p(target) by {sets['margin']:+.3f} ± "
            f"{sets['margin_se']:.3f} (standard error) more than restart {sets['runner_up']}'s"
        )
        line += (
            ": a close call, another sample of cells could rank the other set."
            if sets.get("close")
            else "."
        )
    return line


def _gcd_section(root: Path) -> dict[str, Any] | None:
    """The GCD baseline's ranked directions with their strips, when it has been run."""
    folder = root / "baselines" / "gcd"
    ranking = _json(folder / "ranking.json")
    if not ranking:
        return None
    summary = _json(folder / "explanations" / "summary.json") or {"items": []}
    entries = {e.get("name"): e for e in summary.get("items", []) if isinstance(e, dict)}
    rows = []
    for d in ranking.get("directions", []):
        name = f"rank{d.get('rank')}_{d.get('name')}"
        entry = entries.get(name, {})
        rows.append(
            {
                "rank": d.get("rank"),
                "name": str(d.get("name", "")),
                "step": _fmt(d.get("step"), 2) + ("" if d.get("crossed") else " (no crossing)"),
                "delta_p": _fmt(d.get("mean_delta_p")),
                "flip": _fmt(d.get("flip_rate"), 2),
                "changes": _top_changes(entry),
                "strip": data_uri(root / entry["folder"] / "strip.png")
                if entry.get("folder")
                else None,
            }
        )
    return {"rows": rows, "distance": str(ranking.get("distance", ""))}


def _evaluation_section(root: Path) -> dict[str, Any] | None:
    ev = _json(root / "evaluation.json")
    if not ev:
        return None
    figures = sorted((root / "evaluation").glob("*.png")) if (root / "evaluation").is_dir() else []
    head = ev.get("headline") if isinstance(ev.get("headline"), dict) else {}
    flat = [(k, _fmt(v)) for k, v in ev.items() if isinstance(v, int | float | str)]
    shown_beside = ("top1_", "reference_", "recovery", "leakage", "sufficiency", "n_directions")
    flat += [
        (k.replace("_", " "), _fmt(v))
        for k, v in head.items()
        if not (isinstance(ev.get("comparison"), dict) and k.startswith(shown_beside))
    ]
    sets = (ev.get("realism") or {}).get("sets") or {}

    def dist(name: str, space: str) -> str:
        d = (sets.get(name) or {}).get(space) or {}
        kid = d.get("kid") or {}
        return f"{_fmt(d.get('fid'), 2)} / {_fmt(kid.get('mean'), 3)}" if d else "-"

    rows = []
    for d in ev.get("directions") or []:
        if not isinstance(d, dict):
            continue
        art = d.get("artifacts_sd") or {}
        rows.append(
            {
                "name": str(d.get("name", "")),
                "alpha": _fmt(d.get("alpha"), 2),
                "delta_p": _fmt(d.get("mean_delta_p")),
                "flip": _fmt(d.get("flip_rate"), 2),
                "l1": _fmt((d.get("proximity") or {}).get("l1"), 4),
                "cout": _fmt(d.get("cout"), 2),
                "clf": dist(str(d.get("name")), "classifier"),
                "imagenet": dist(str(d.get("name")), "imagenet"),
                "hf": _fmt(art.get("high_frequency"), 1),
                "bg": _fmt(art.get("background"), 1),
            }
        )
    for name in ("real_source", "reconstruction"):
        if name in sets:
            rows.append(
                {
                    "name": f"({name.replace('_', ' ')})",
                    **dict.fromkeys(("alpha", "delta_p", "flip", "l1", "cout", "hf", "bg"), ""),
                    "clf": dist(name, "classifier"),
                    "imagenet": dist(name, "imagenet"),
                }
            )
    gt = ev.get("ground_truth") if isinstance(ev.get("ground_truth"), dict) else None
    sens = ((gt or {}).get("classifier_sensitivity") or {}).get("factors") or {}
    kept = (ev.get("fidelity") or {}).get("morphology") or {}
    factors = [
        (
            f,
            "+" if v.get("expected_sign", 0) > 0 else "-",
            ", ".join(v.get("by") or []) or "no",
            _fmt((sens.get(f) or {}).get("mean_delta_p")),
            _fmt((kept.get(f) or {}).get("r"), 2),
        )
        for f, v in ((gt or {}).get("factors") or {}).items()
        if isinstance(v, dict)
    ]
    comp = ev.get("comparison") if isinstance(ev.get("comparison"), dict) else {}
    labels = comp.get("metrics") if isinstance(comp.get("metrics"), dict) else {}
    methods = comp.get("methods") if isinstance(comp.get("methods"), dict) else {}
    compare = None
    if labels and len(methods) > 1:
        compare = {
            "methods": [str(m) for m in methods],
            "rows": [
                (str(label), [_fmt((methods[m] or {}).get(key)) for m in methods])
                for key, label in labels.items()
            ],
        }
    return {
        "numbers": flat,
        "compare": compare,
        "rows": rows,
        "factors": factors,
        "figures": [(p.stem, data_uri(p)) for p in figures],
    }


def _timings(root: Path) -> list[tuple[str, str]]:
    stages = root / ".stages"
    out = []
    if stages.is_dir():
        for marker in sorted(stages.glob("*.json"), key=lambda p: p.stat().st_mtime):
            sec = (read_json(marker) or {}).get("seconds")
            if _finite(sec):
                out.append((marker.stem, f"{sec / 60:.1f} min" if sec >= 90 else f"{sec:.0f} s"))
    if not out:
        for stage in ("classifier", "autoencoder", "directions"):
            m = _json(root / stage / "metrics.json") or {}
            sec = m.get("train_seconds")
            if _finite(sec):
                out.append((stage, f"{sec:.0f} s (training)"))
    return out


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path."""
    root = Path(run)
    if not root.is_dir():
        raise DiffexError(f"run folder not found: {root}")
    context = {
        "run": str(root.resolve()),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "command": " ".join(sys.argv[1:]) if sys.argv else "",
        "preset": (_json(root / "demo_summary.json") or {}).get("preset"),
        "timings": _timings(root),
        "data": _data_section(root),
        "classifier": _classifier_section(root),
        "autoencoder": _autoencoder_section(root),
        "directions": _directions_section(root),
        "gcd": _gcd_section(root),
        "evaluation": _evaluation_section(root),
        "drift_rho": DRIFT_RHO,
    }
    if not any(context[k] for k in ("data", "classifier", "autoencoder", "directions")):
        raise DiffexError(f"{root} holds no DiffEx results to report (no data.json)")
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("diffex.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template(TEMPLATE).render(**context)
    path = Path(out) if out is not None else root / "report.html"
    write_atomic(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return path  # the CLI prints it (once)
