"""``diffex prepare bbbc021``: BBBC021 plate images to single-cell crops and a CSV manifest.

Reads ``BBBC021_v1_image.csv`` (and optionally ``BBBC021_v1_moa.csv``), selects the image
rows of the requested conditions, finds nuclei in the DAPI channel (or takes them from a
CSV), normalises every channel per plate by percentiles and writes 3-channel uint16 TIFF
crops (DAPI, tubulin, actin) with ``manifest.csv`` and ``dataset.json`` beside them.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffex.data.images import read_image
from diffex.errors import DiffexError
from diffex.io.atomic import write_atomic, write_json
from diffex.log import info, track, warn

CHANNELS = (
    {"name": "DAPI", "color": "#3b6cff"},
    {"name": "tubulin", "color": "#3bd15a"},
    {"name": "actin", "color": "#ff3b3b"},
)
CHANNEL_COLUMNS = ("DAPI", "Tubulin", "Actin")
IMAGE_COLUMNS = (
    "ImageNumber",
    *(f"Image_{kind}Name_{ch}" for ch in CHANNEL_COLUMNS for kind in ("File", "Path")),
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
)
MOA_COLUMNS = ("compound", "concentration", "moa")
MANIFEST_COLUMNS = (
    "path",
    "label",
    "group",
    "plate",
    "well",
    "compound",
    "concentration",
    "x",
    "y",
)
MAX_SAMPLES = 2_000_000  # pixels per channel per plate used for the percentiles
REL_TOL = 1e-9


@dataclass
class Bbbc021Config:
    """Inputs and settings of one ``prepare bbbc021`` run."""

    images: Path
    metadata: Path
    moa: Path | None
    conditions: list[str]
    out: Path
    crop_size: int = 96
    centres: Path | None = None
    low_pct: float = 1.0
    high_pct: float = 99.8
    min_nucleus_area: int = 30
    max_cells_per_image: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Condition:
    """A parsed condition: ``COMPOUND@CONC``, a bare ``COMPOUND`` or ``moa:NAME``."""

    text: str
    label: str
    compound: str | None = None
    concentration: float | None = None
    moa: str | None = None


@dataclass
class ImageRow:
    """One row of the BBBC021 image table (one field of view, three channel files)."""

    line: int
    number: str
    plate: str
    well: str
    compound: str
    concentration: float
    names: tuple[str, str, str]
    folders: tuple[str, str, str]


# --- conditions ---------------------------------------------------------------------------


def sanitize_label(text: str) -> str:
    """A safe folder-name component: keep letters, digits, ``-_.@``; other runs become ``_``."""
    label = re.sub(r"[^A-Za-z0-9._@-]+", "_", text.strip()).strip("_").lstrip(".")
    if not label:
        raise DiffexError(f"condition {text!r} gives an empty label")
    return label


def parse_condition(text: str) -> Condition:
    """Parse ``"COMPOUND@CONC"``, ``"COMPOUND"`` or ``"moa:NAME"``."""
    raw = text.strip()
    if not raw:
        raise DiffexError("empty condition: use COMPOUND@CONC, COMPOUND or moa:NAME")
    label = sanitize_label(raw)
    if raw.lower().startswith("moa:"):
        name = raw[4:].strip()
        if not name:
            raise DiffexError(f"condition {text!r} names no MOA after 'moa:'")
        return Condition(raw, label, moa=name)
    if "@" not in raw:
        return Condition(raw, label, compound=raw)
    compound, _, conc = raw.rpartition("@")
    try:
        value = float(conc)
    except ValueError:
        raise DiffexError(
            f"condition {text!r}: concentration {conc.strip()!r} is not a number"
        ) from None
    if not compound.strip():
        raise DiffexError(f"condition {text!r} names no compound before '@'")
    return Condition(raw, label, compound=compound.strip(), concentration=value)


def _same_conc(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)


def _few(values: Iterable[str], n: int = 8) -> str:
    items = sorted(set(values), key=str.lower)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _matches(cond: Condition, row: ImageRow, moa_pairs: list[tuple[str, float]]) -> bool:
    compound = row.compound.lower()
    if cond.moa is not None:
        return any(c == compound and _same_conc(v, row.concentration) for c, v in moa_pairs)
    if compound != (cond.compound or "").lower():
        return False
    return cond.concentration is None or _same_conc(cond.concentration, row.concentration)


def select_rows(
    rows: list[ImageRow], conditions: list[Condition], moa: list[tuple[str, float, str]] | None
) -> list[tuple[ImageRow, Condition]]:
    """The image rows of each condition; errors name conditions that match nothing."""
    compounds = {r.compound.lower(): r.compound for r in rows}
    selected: dict[int, tuple[ImageRow, Condition]] = {}
    for cond in conditions:
        pairs = _moa_pairs(cond, moa)
        if cond.compound is not None and cond.compound.lower() not in compounds:
            raise DiffexError(
                f"condition {cond.text!r}: unknown compound {cond.compound!r} "
                f"(available: {_few(compounds.values())})"
            )
        hits = [r for r in rows if _matches(cond, r, pairs)]
        if not hits:
            raise DiffexError(f"condition {cond.text!r} matches no image rows{_hint(cond, rows)}")
        for r in hits:
            if r.line in selected:
                raise DiffexError(
                    f"image row {r.number} ({r.compound}@{r.concentration:g}) matches both "
                    f"{selected[r.line][1].text!r} and {cond.text!r}"
                )
            selected[r.line] = (r, cond)
    return [selected[k] for k in sorted(selected)]


def _moa_pairs(
    cond: Condition, moa: list[tuple[str, float, str]] | None
) -> list[tuple[str, float]]:
    if cond.moa is None:
        return []
    if moa is None:
        raise DiffexError(f"condition {cond.text!r} needs the MOA table (BBBC021_v1_moa.csv)")
    pairs = [(c.lower(), v) for c, v, m in moa if m.lower() == cond.moa.lower()]
    if not pairs:
        raise DiffexError(
            f"condition {cond.text!r}: unknown MOA {cond.moa!r} "
            f"(available: {_few(m for _, _, m in moa)})"
        )
    return pairs


def _hint(cond: Condition, rows: list[ImageRow]) -> str:
    if cond.compound is None:
        return ""
    concs = {f"{r.concentration:g}" for r in rows if r.compound.lower() == cond.compound.lower()}
    return f" (concentrations of {cond.compound!r}: {_few(concs)})"


# --- tables -------------------------------------------------------------------------------


def _read_csv(path: Path, required: Iterable[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """Rows (with their line numbers) of a CSV that must hold the ``required`` columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = [
                (i, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
                for i, row in enumerate(reader, start=2)
            ]
    except FileNotFoundError:
        raise DiffexError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DiffexError(f"cannot read {what} {path}: {exc}") from None
    for col in required:
        if col not in fields:
            raise DiffexError(f"{what} {path} has no '{col}' column")
    return rows


def _float(value: str, path: Path, line: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DiffexError(f"{path} line {line}: {column} {value!r} is not a number") from None


def _per_channel(row: dict[str, str], kind: str) -> tuple[str, str, str]:
    dapi, tubulin, actin = (row[f"Image_{kind}_{c}"] for c in CHANNEL_COLUMNS)
    return dapi, tubulin, actin


def read_image_table(path: Path) -> list[ImageRow]:
    """Parse ``BBBC021_v1_image.csv``."""
    out = []
    for line, row in _read_csv(path, IMAGE_COLUMNS, "image table"):
        conc = row["Image_Metadata_Concentration"]
        out.append(
            ImageRow(
                line=line,
                number=row["ImageNumber"],
                plate=row["Image_Metadata_Plate_DAPI"],
                well=row["Image_Metadata_Well_DAPI"],
                compound=row["Image_Metadata_Compound"],
                concentration=_float(conc, path, line, "Image_Metadata_Concentration"),
                names=_per_channel(row, "FileName"),
                folders=_per_channel(row, "PathName"),
            )
        )
    if not out:
        raise DiffexError(f"image table {path} has no rows")
    return out


def read_moa_table(path: Path) -> list[tuple[str, float, str]]:
    """Parse ``BBBC021_v1_moa.csv`` into (compound, concentration, moa) tuples."""
    return [
        (row["compound"], _float(row["concentration"], path, line, "concentration"), row["moa"])
        for line, row in _read_csv(path, MOA_COLUMNS, "MOA table")
    ]


def read_centres(path: Path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """Nucleus centres per image from a CSV keyed by ``Image_FileName_DAPI`` or ``ImageNumber``.

    Returns the key column and ``{key: [(y, x), ...]}``.
    """
    rows = _read_csv(path, ("x", "y"), "centres file")
    fields = rows[0][1].keys() if rows else ()
    key = next((c for c in ("Image_FileName_DAPI", "ImageNumber") if c in fields), None)
    if key is None:
        raise DiffexError(
            f"centres file {path} has no 'Image_FileName_DAPI' or 'ImageNumber' column"
        )
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line, row in rows:
        out[row[key]].append((_float(row["y"], path, line, "y"), _float(row["x"], path, line, "x")))
    return key, dict(out)


def _image_paths(root: Path, row: ImageRow, table: Path) -> list[Path]:
    """The three channel files of a row (PathName ``Week1_22123`` or ``Week1/Week1_22123``)."""
    paths = []
    for folder, name in zip(row.folders, row.names, strict=True):
        first = root / folder / name
        candidates = [first, root / Path(folder).name / name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DiffexError(f"image not found: {first} (from {table} line {row.line})")
        paths.append(found)
    return paths


def _read_channels(paths: list[Path]) -> np.ndarray:
    """(3, H, W) float32 from the DAPI, tubulin and actin files (channel 0 of each)."""
    planes = [read_image(p)[0] for p in paths]
    if len({p.shape for p in planes}) != 1:
        shapes = ", ".join(f"{p.name} {a.shape}" for p, a in zip(paths, planes, strict=True))
        raise DiffexError(f"channel images differ in size: {shapes}")
    return np.stack(planes).astype(np.float32)


# --- nuclei, normalisation, crops ---------------------------------------------------------


def find_nuclei(dapi: np.ndarray, min_area: int = 30, sigma: float = 2.0) -> np.ndarray:
    """Nucleus centres (N, 2) as (y, x): Gaussian blur, Otsu, size filter, watershed split."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    smooth = gaussian(dapi.astype(np.float32), sigma=sigma, preserve_range=True)
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros((0, 2))
    mask = smooth > threshold_otsu(smooth)
    labels = label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    mask = keep[labels]
    # Split touching nuclei: one marker per distinct peak (height >= 1 px) of the distance map.
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
    markers = label(h_maxima(dist, 1.0) & mask)
    labels = watershed(-dist, markers, mask=mask)
    regions = [r for r in regionprops(labels) if r.area >= min_area]
    return np.array([r.centroid for r in regions], dtype=float).reshape(-1, 2)


def _sample(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` pixels per channel of a (C, H, W) image, as (C, n)."""
    flat = img.reshape(img.shape[0], -1)
    if flat.shape[1] <= n:
        return flat
    return flat[:, rng.integers(0, flat.shape[1], n)]


def normalise(img: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map each channel from [low, high] to [0, 65535] uint16 with clipping."""
    lo = np.asarray(low, dtype=np.float32)[:, None, None]
    span = np.maximum(np.asarray(high, dtype=np.float32)[:, None, None] - lo, 1e-6)
    unit = np.clip((img - lo) / span, 0.0, 1.0)
    return np.round(unit * 65535.0).astype(np.uint16)


def crop_origins(
    centres: np.ndarray, shape: tuple[int, int], size: int
) -> tuple[list[tuple[int, int, int]], int]:
    """(k, top, left) of every crop that fits inside ``shape``, and how many did not."""
    h, w = shape
    half = size // 2
    kept, skipped = [], 0
    for k, (y, x) in enumerate(centres):
        top, left = int(round(y)) - half, int(round(x)) - half
        if top < 0 or left < 0 or top + size > h or left + size > w:
            skipped += 1
        else:
            kept.append((k, top, left))
    return kept, skipped


# --- the run ------------------------------------------------------------------------------


def _check_config(cfg: Bbbc021Config) -> list[Condition]:
    if not Path(cfg.images).is_dir():
        raise DiffexError(f"images folder not found: {cfg.images}")
    if cfg.crop_size < 8:
        raise DiffexError(f"crop size must be at least 8 pixels, got {cfg.crop_size}")
    if not 0 <= cfg.low_pct < cfg.high_pct <= 100:
        raise DiffexError(
            f"percentiles must satisfy 0 <= low < high <= 100, got {cfg.low_pct}, {cfg.high_pct}"
        )
    if cfg.min_nucleus_area < 1:
        raise DiffexError(f"minimum nucleus area must be >= 1, got {cfg.min_nucleus_area}")
    if cfg.max_cells_per_image is not None and cfg.max_cells_per_image < 1:
        raise DiffexError(f"max cells per image must be >= 1, got {cfg.max_cells_per_image}")
    conditions = [parse_condition(c) for c in cfg.conditions]
    if len(conditions) < 2:
        raise DiffexError(
            f"need at least two conditions to compare, got {len(conditions)}: "
            f"{', '.join(c.text for c in conditions) or 'none'}"
        )
    labels = Counter(c.label for c in conditions)
    dup = [lab for lab, n in labels.items() if n > 1]
    if dup:
        raise DiffexError(f"conditions give the same label {dup[0]!r}; name each condition once")
    return conditions


def _centres_for(
    row: ImageRow, img: np.ndarray, cfg: Bbbc021Config, given: tuple[str, dict] | None
) -> np.ndarray:
    if given is None:
        return find_nuclei(img[0], cfg.min_nucleus_area)
    key, table = given
    value = row.names[0] if key == "Image_FileName_DAPI" else row.number
    return np.array(table.get(value, []), dtype=float).reshape(-1, 2)


def _plate_percentiles(
    selected: list[tuple[ImageRow, Condition, list[Path]]], cfg: Bbbc021Config
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """First pass: per-plate (2, C) low/high percentiles and the nucleus centres of each row."""
    rng = np.random.default_rng([cfg.seed, 0])
    given = read_centres(Path(cfg.centres)) if cfg.centres is not None else None
    per_plate = Counter(row.plate for row, _, _ in selected)
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    centres: dict[int, np.ndarray] = {}
    for row, _, paths in track(selected, "reading images", total=len(selected)):
        img = _read_channels(paths)
        budget = max(1, MAX_SAMPLES // per_plate[row.plate])
        samples[row.plate].append(_sample(img, budget, rng))
        centres[row.line] = _centres_for(row, img, cfg, given)
    bounds = {}
    for plate, parts in samples.items():
        pix = np.concatenate(parts, axis=1)
        bounds[plate] = np.percentile(pix, [cfg.low_pct, cfg.high_pct], axis=1)
    return bounds, centres


def _write_crops(
    selected: list[tuple[ImageRow, Condition, list[Path]]],
    bounds: dict[str, np.ndarray],
    centres: dict[int, np.ndarray],
    cfg: Bbbc021Config,
) -> tuple[list[dict[str, str]], int]:
    """Second pass: normalise each image, cut and write its crops; manifest rows and skips."""
    import tifffile

    out = Path(cfg.out)
    rng = np.random.default_rng([cfg.seed, 1])
    rows: list[dict[str, str]] = []
    skipped = 0
    for row, cond, paths in track(selected, "writing crops", total=len(selected)):
        img = _read_channels(paths)
        pts = centres[row.line]
        kept, n_skip = crop_origins(pts, img.shape[1:], cfg.crop_size)
        skipped += n_skip
        if cfg.max_cells_per_image is not None and len(kept) > cfg.max_cells_per_image:
            pick = np.sort(rng.choice(len(kept), cfg.max_cells_per_image, replace=False))
            kept = [kept[i] for i in pick]
        if not kept:
            continue
        norm = normalise(img, *bounds[row.plate])
        folder = out / "crops" / cond.label
        folder.mkdir(parents=True, exist_ok=True)
        stem = "_".join(sanitize_label(s) for s in (row.plate, row.well, row.number))
        for k, top, left in kept:
            crop = np.ascontiguousarray(
                norm[:, top : top + cfg.crop_size, left : left + cfg.crop_size]
            )
            path = folder / f"{stem}_{k}.tif"
            tifffile.imwrite(path, crop, photometric="minisblack", metadata={"axes": "CYX"})
            y, x = pts[k]
            rows.append(
                {
                    "path": path.relative_to(out).as_posix(),
                    "label": cond.label,
                    "group": row.plate,
                    "plate": row.plate,
                    "well": row.well,
                    "compound": row.compound,
                    "concentration": f"{row.concentration:g}",
                    "x": f"{x:.1f}",
                    "y": f"{y:.1f}",
                }
            )
    return rows, skipped


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    write_atomic(path, writer)


def _clear_crops(out: Path) -> None:
    crops = out / "crops"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if crops.is_symlink() or crops.is_file():
            crops.unlink()
        elif crops.exists():
            shutil.rmtree(crops)
    except OSError as exc:
        raise DiffexError(f"cannot prepare output folder {out}: {exc.strerror or exc}") from None


def prepare_bbbc021(cfg: Bbbc021Config) -> dict:
    """Turn BBBC021 images of the chosen conditions into crops, ``manifest.csv`` and
    ``dataset.json`` under ``cfg.out``; return a summary of the counts."""
    conditions = _check_config(cfg)
    metadata = Path(cfg.metadata)
    rows = read_image_table(metadata)
    moa = read_moa_table(Path(cfg.moa)) if cfg.moa is not None else None
    chosen = select_rows(rows, conditions, moa)
    selected = [(r, c, _image_paths(Path(cfg.images), r, metadata)) for r, c in chosen]
    bounds, centres = _plate_percentiles(selected, cfg)
    out = Path(cfg.out)
    _clear_crops(out)
    manifest, skipped = _write_crops(selected, bounds, centres, cfg)
    per_label = Counter(m["label"] for m in manifest)
    empty = [c.label for c in conditions if per_label[c.label] == 0]
    for label in empty:
        warn(f"condition {label!r} gave no cells (crop size {cfg.crop_size} may be too large)")
    if len(conditions) - len(empty) < 2:
        raise DiffexError(
            f"fewer than two conditions gave cells (none for {', '.join(empty)}); "
            "try a smaller crop size or check the nucleus settings"
        )
    summary = {
        "images": len(selected),
        "crops": len(manifest),
        "skipped_border": skipped,
        "per_condition": {c.label: per_label[c.label] for c in conditions},
        "images_per_condition": dict(Counter(c.label for _, c, _ in selected)),
        "per_plate": dict(sorted(Counter(m["plate"] for m in manifest).items())),
    }
    _write_manifest(out / "manifest.csv", manifest)
    write_json(out / "dataset.json", _dataset_json(cfg, conditions, bounds, summary))
    info(
        f"BBBC021: {summary['crops']} crops from {summary['images']} images "
        f"({skipped} skipped at the border) -> {out / 'manifest.csv'}"
    )
    return summary


def _dataset_json(
    cfg: Bbbc021Config, conditions: list[Condition], bounds: dict[str, np.ndarray], summary: dict
) -> dict:
    names = [c["name"] for c in CHANNELS]
    plates = {
        plate: {n: [float(b[0, i]), float(b[1, i])] for i, n in enumerate(names)}
        for plate, b in sorted(bounds.items())
    }
    return {
        "name": "BBBC021",
        "channels": [dict(c) for c in CHANNELS],
        "normalization": {
            "method": "percentile per plate and channel, mapped to 0..65535",
            "low_pct": cfg.low_pct,
            "high_pct": cfg.high_pct,
            "plates": plates,
        },
        "crop_size": cfg.crop_size,
        "conditions": [{"condition": c.text, "label": c.label} for c in conditions],
        "source": {
            "images": str(cfg.images),
            "metadata": str(cfg.metadata),
            "moa": str(cfg.moa) if cfg.moa is not None else None,
            "centres": str(cfg.centres) if cfg.centres is not None else None,
        },
        "summary": summary,
    }
