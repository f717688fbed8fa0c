"""Procedural single-cell microscopy images with known ground-truth factors.

Each image is one cell: a cell body (actin channel, stress fibres along the long axis and a
brighter cortex), a nucleus inside it (DAPI channel, smooth with faint texture and a few
chromocentres), puncta in the cytoplasm (spots channel), then a global gain (``brightness``), a
background offset and Poisson-like noise (sd = ``noise * sqrt(0.25 + signal)``). What each factor
means is listed in :data:`diffex.data.spec.KNOWN_FACTORS`; everything else (fibre layout, spot
positions, texture) is drawn from the per-image random generator and carries no class signal.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from diffex.data.display import composite
from diffex.data.spec import KNOWN_FACTORS, REFERENCE_SIZE, SynthSpec, load_spec
from diffex.errors import DiffexError

DEFAULT_ROLES = ("nucleus", "actin", "spots")
GENERATOR = "diffex synth"

# Fixed appearance constants (not factors).
_DAPI_LEVEL = 0.55  # nuclear DAPI signal before gain
_SPOT_DIFFUSE = 0.05  # diffuse cytoplasmic signal in the spots channel
_SPOT_MIN_DIST = 3.0  # px (64-px frame) between puncta centres, so that they stay countable
_MEMBRANE_LEVEL = 0.6


def sample_factors(
    spec: SynthSpec, condition: str, n: int, rng: np.random.Generator
) -> list[dict[str, float]]:
    """Draw ``n`` factor sets for ``condition`` (base distribution + the condition's shifts)."""
    cols = {name: f.sample(rng, n, spec.shift(condition, name)) for name, f in spec.factors.items()}
    return [{k: float(v[i]) for k, v in cols.items()} for i in range(n)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    t = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return t / (t.std() + 1e-12)


def _shape_sdist(
    p: np.ndarray, q: np.ndarray, a: float, b: float, rng: np.random.Generator, wobble: float
) -> np.ndarray:
    """Approximate signed distance (px, positive inside) to an ellipse with a wobbly outline.

    The outline is r(phi) = 1 + sum_k a_k cos(k phi + phi_k), k = 3..5 (no k = 2 term, so the
    wobble does not change the elongation).
    """
    pn, qn = p / a, q / b
    rho = np.hypot(pn, qn)
    phi = np.arctan2(qn, pn)
    amps = rng.uniform(0.0, wobble, 3)
    phases = rng.uniform(0.0, 2 * np.pi, 3)
    r = 1.0 + sum(amps[i] * np.cos((i + 3) * phi + phases[i]) for i in range(3))
    return (r - rho) * np.hypot(a * np.cos(phi), b * np.sin(phi))


def _gauss_spots(
    xs: np.ndarray, ys: np.ndarray, amp: np.ndarray, sigma: np.ndarray, coords: np.ndarray
) -> np.ndarray:
    """Sum of isotropic Gaussians at image positions (xs, ys), rendered separably -> (H, W)."""
    if len(xs) == 0:
        return np.zeros((len(coords), len(coords)))
    gx = np.exp(-0.5 * ((coords[None, :] - xs[:, None]) / sigma[:, None]) ** 2)  # (K, W)
    gy = np.exp(-0.5 * ((coords[None, :] - ys[:, None]) / sigma[:, None]) ** 2)  # (K, H)
    return (gy * amp[:, None]).T @ gx


def _place_spots(
    count: int, a: float, b: float, min_dist: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform in an ellipse (cell-local coords), at least ``min_dist`` apart.

    Random sequential placement over a fixed candidate pool; if the pool runs out (very small,
    crowded cells), the remaining points are taken from the pool regardless of distance.
    """
    m = 8 * count + 40
    r = np.sqrt(rng.uniform(0.0, 1.0, m))
    ang = rng.uniform(0.0, 2 * np.pi, m)
    ps, qs = a * r * np.cos(ang), b * r * np.sin(ang)
    if count == 0:
        return ps[:0], qs[:0]
    close = (ps[:, None] - ps[None, :]) ** 2 + (qs[:, None] - qs[None, :]) ** 2 < min_dist**2
    blocked = np.zeros(m, dtype=bool)
    taken: list[int] = []
    for j in range(m):
        if blocked[j]:
            continue
        taken.append(j)
        if len(taken) == count:
            break
        blocked |= close[j]
    if len(taken) < count:
        rest = [j for j in range(m) if j not in set(taken)]
        taken += rest[: count - len(taken)]
    idx = np.array(taken)
    return ps[idx], qs[idx]


def render_cell(
    factors: dict[str, float],
    size: int,
    rng: np.random.Generator,
    roles: Sequence[str] = DEFAULT_ROLES,
) -> np.ndarray:
    """Render one cell -> float32 (C, H, W) in [0, 1], one channel per entry of ``roles``.

    ``factors`` may omit factors (they take their defaults); lengths and areas are in pixels of
    a 64-px frame and are scaled by ``size / 64``.
    """
    unknown = sorted(set(factors) - set(KNOWN_FACTORS))
    if unknown:
        raise DiffexError(f"render_cell: unknown factor {unknown[0]!r}")
    f = {k: float(factors.get(k, info.default)) for k, info in KNOWN_FACTORS.items()}
    s = size / REFERENCE_SIZE
    coords = np.arange(size) + 0.5 - size / 2.0
    gx, gy = coords[None, :], coords[:, None]

    # Cell frame: p along the long axis, q across it. Rotation is counter-clockwise on screen.
    th = np.deg2rad(f["rotation"])
    ux, uy, vx, vy = np.cos(th), -np.sin(th), np.sin(th), np.cos(th)
    cx, cy = f["offset_x"] * s, f["offset_y"] * s
    dx, dy = gx - cx, gy - cy
    p, q = dx * ux + dy * uy, dx * vx + dy * vy

    def to_image(pl: np.ndarray, ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cx + pl * ux + ql * vx, cy + pl * uy + ql * vy

    # Cell body.
    e = max(f["elongation"], 1.0)
    area = f["cell_area"] * s * s
    a, b = np.sqrt(area * e / np.pi), np.sqrt(area / (np.pi * e))
    cell_d = _shape_sdist(p, q, a, b, rng, wobble=0.04)
    cell = _sigmoid(cell_d / (0.6 * s))
    cell_w = cell.sum() + 1e-9

    # Nucleus: follows the cell's axis, a little rounder than the cell, kept inside it.
    n_area = f["nucleus_area"] * s * s
    n_asp = 1.0 + 0.35 * (e - 1.0)
    nb = min(np.sqrt(n_area / (np.pi * n_asp)), 0.72 * b)
    na = min(n_area / (np.pi * nb), 0.8 * a)
    pc = rng.uniform(-1, 1) * 0.35 * max(0.0, 0.8 * a - na)
    qc = rng.uniform(-1, 1) * 0.3 * max(0.0, 0.75 * b - nb)
    dn = np.deg2rad(rng.normal(0.0, 8.0))
    p2 = (p - pc) * np.cos(dn) + (q - qc) * np.sin(dn)
    q2 = -(p - pc) * np.sin(dn) + (q - qc) * np.cos(dn)
    nuc = _sigmoid(_shape_sdist(p2, q2, na, nb, rng, wobble=0.03) / (0.45 * s))

    channels: dict[str, np.ndarray] = {}
    if "nucleus" in roles:
        k = rng.integers(2, 6)
        rr, aa = 0.6 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
        pf, qf = na * rr * np.cos(aa), nb * rr * np.sin(aa)
        pl = pc + pf * np.cos(dn) - qf * np.sin(dn)
        ql = qc + pf * np.sin(dn) + qf * np.cos(dn)
        fx, fy = to_image(pl, ql)
        foci = _gauss_spots(fx, fy, rng.uniform(0.15, 0.3, k), np.full(k, 0.9 * s), coords)
        pat = 1.0 + 0.1 * _smooth_noise(rng, size, 1.2 * s) + foci
        pat /= (pat * nuc).sum() / (nuc.sum() + 1e-9)
        channels["nucleus"] = _DAPI_LEVEL * nuc * pat

    if "actin" in roles:
        k = int(rng.integers(9, 16))
        dlt = np.deg2rad(rng.normal(0.0, 5.0, k))[:, None, None]
        qk = rng.uniform(-0.9, 0.9, k)[:, None, None] * b
        pk = rng.uniform(-0.2, 0.2, k)[:, None, None] * a
        half = rng.uniform(0.5, 1.0, k)[:, None, None] * a
        amp = rng.uniform(0.4, 1.0, k)[:, None, None]
        wid = rng.uniform(0.5, 0.9, k)[:, None, None] * s
        pp, qq = p[None] - pk, q[None] - qk
        along = pp * np.cos(dlt) + qq * np.sin(dlt)
        across = -pp * np.sin(dlt) + qq * np.cos(dlt)
        fib = (amp * np.exp(-0.5 * (across / wid) ** 2) * _sigmoid((half - np.abs(along)) / s)).sum(
            0
        )
        rim = np.exp(-(((cell_d - 1.5 * s) / (1.2 * s)) ** 2))
        grain = 1.0 + 0.1 * _smooth_noise(rng, size, 1.0 * s)
        pat = grain * (0.5 + 0.2 * rim + 0.8 * fib / (fib.max() + 1e-9))
        pat /= (pat * cell).sum() / cell_w
        channels["actin"] = f["actin_intensity"] * cell * pat

    if "spots" in roles:
        count = int(round(f["spot_count"]))
        ps, qs = _place_spots(count, 0.85 * a, 0.85 * b, _SPOT_MIN_DIST * s, rng)
        sx, sy = to_image(ps, qs)
        amp = rng.uniform(0.45, 0.85, count)
        sig = rng.uniform(0.75, 1.05, count) * s
        channels["spots"] = _SPOT_DIFFUSE * cell + _gauss_spots(sx, sy, amp, sig, coords)

    if "membrane" in roles:
        channels["membrane"] = _MEMBRANE_LEVEL * np.exp(-((cell_d / (0.9 * s)) ** 2))

    unknown_roles = sorted(set(roles) - set(channels))
    if unknown_roles:
        raise DiffexError(f"render_cell: unknown channel role {unknown_roles[0]!r}")
    img = f["brightness"] * np.stack([channels[r] for r in roles]) + f["background"]
    img = img + f["noise"] * np.sqrt(0.25 + img) * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def image_rng(seed: int, condition_index: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of condition ``condition_index`` (sorted order).

    Independent of ``n`` and of generation order, so a larger dataset extends a smaller one.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(condition_index, index)))


def _write_image(img: np.ndarray, path: Path, fmt: str) -> None:
    if fmt == "png":
        u8 = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
        if u8.shape[0] == 1:
            Image.fromarray(u8[0], mode="L").save(path)
            return
        if u8.shape[0] == 2:
            u8 = np.concatenate([u8, np.zeros_like(u8[:1])])
        Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), mode="RGB").save(path)
    else:
        u16 = np.round(np.clip(img, 0, 1) * 65535.0).astype(np.uint16)
        tifffile.imwrite(path, u16, photometric="minisblack")


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DiffexError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DiffexError(f"output folder {out} is not empty (pass overwrite to replace it)")
        meta = out / "dataset.json"
        try:
            previous = json.loads(meta.read_text()).get("generator") if meta.is_file() else None
        except (OSError, ValueError):
            previous = None
        if previous != GENERATOR:
            raise DiffexError(
                f"output folder {out} is not empty and is not a previous synth output; "
                "refusing to overwrite it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    spec: SynthSpec | str | Path | None,
    out: str | Path,
    n: int,
    seed: int,
    size: int | None = None,
    fmt: str = "png",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset of ``n`` images in total, split evenly across conditions.

    Layout: ``out/<condition>/<condition>_00000.png`` (8-bit RGB, channels in spec order) or
    ``.tif`` (16-bit, channel-first), plus ``factors.csv``, ``spec.yaml``, ``dataset.json`` and
    ``contact_sheet.png``. Same seed -> byte-identical images and factors.csv. When ``n`` does
    not divide evenly, the first conditions (sorted) get one image more.
    """
    if not isinstance(spec, SynthSpec):
        spec = load_spec(spec)
    out = Path(out)
    fmt = fmt.lower().lstrip(".")
    if fmt == "tiff":
        fmt = "tif"
    if fmt not in ("png", "tif"):
        raise DiffexError(f"image format {fmt!r} not supported (use png or tif)")
    nch = len(spec.channels)
    if fmt == "png" and nch > 3:
        raise DiffexError(f"spec has {nch} channels; PNG holds at most 3, use fmt='tif'")
    size = spec.image_size if size is None else int(size)
    if not 32 <= size <= 1024:
        raise DiffexError(f"image size {size} out of range [32, 1024]")
    classes = spec.condition_names
    if isinstance(n, bool) or not isinstance(n, int) or n < len(classes):
        raise DiffexError(f"n={n!r}: need at least one image per condition ({len(classes)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DiffexError(f"seed={seed!r}: expected a non-negative integer")
    _prepare_out(out, overwrite)

    k = len(classes)
    counts = [n // k + (i < n % k) for i in range(k)]
    factor_names = list(spec.factors)
    rows: list[list[str]] = []
    examples: dict[str, list[np.ndarray]] = {}
    for ci, (cond, cnt) in enumerate(zip(classes, counts, strict=True)):
        (out / cond).mkdir()
        examples[cond] = []
        for i in range(cnt):
            rng = image_rng(seed, ci, i)
            fac = sample_factors(spec, cond, 1, rng)[0]
            img = render_cell(fac, size, rng, spec.roles)
            rel = f"{cond}/{cond}_{i:05d}.{fmt}"
            _write_image(img, out / rel, fmt)
            rows.append([rel, cond] + [_fmt_value(fac[f]) for f in factor_names])
            if len(examples[cond]) < _SHEET_COLS * _SHEET_ROWS:
                examples[cond].append(img)

    with open(out / "factors.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "condition", *factor_names])
        w.writerows(rows)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    meta = {
        "channels": [{"name": c.name, "color": c.color} for c in spec.channels],
        "classes": classes,
        "image_size": size,
        "generator": GENERATOR,
        "seed": seed,
        "n": n,
        "format": fmt,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    contact_sheet(examples, [c.color for c in spec.channels], [c.name for c in spec.channels]).save(
        out / "contact_sheet.png"
    )
    return out


_SHEET_COLS, _SHEET_ROWS = 8, 2


def contact_sheet(
    examples: dict[str, list[np.ndarray]],
    colors: Sequence[str],
    channel_names: Sequence[str] | None = None,
    tile: int = 128,
    cols: int = _SHEET_COLS,
) -> Image.Image:
    """A labelled grid of false-colour cells: one block of rows per condition."""
    try:
        font = ImageFont.load_default(size=16)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        font = ImageFont.load_default()
    label_w, gap, head = 140, 4, 28
    blocks = {c: -(-len(v) // cols) for c, v in examples.items()}
    height = head + sum(r * (tile + gap) + gap for r in blocks.values())
    sheet = Image.new("RGB", (label_w + cols * (tile + gap) + gap, height), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    x = gap
    for name, color in zip(channel_names or [], colors, strict=False):
        draw.text((x, 6), name, fill=color, font=font)
        x += int(draw.textlength(name, font=font)) + 16
    y = head
    for cond, imgs in examples.items():
        draw.text((gap, y + 6), cond, fill=(235, 235, 235), font=font)
        for j, img in enumerate(imgs):
            rgb = Image.fromarray(composite(img, colors)).resize((tile, tile), Image.NEAREST)
            sheet.paste(
                rgb, (label_w + gap + (j % cols) * (tile + gap), y + (j // cols) * (tile + gap))
            )
        y += blocks[cond] * (tile + gap) + gap
        draw.line([(0, y - gap // 2), (sheet.width, y - gap // 2)], fill=(90, 90, 90))
    return sheet
