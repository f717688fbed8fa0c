"""Finding the images of a data set: an image folder (class = subfolder) or a CSV manifest."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffex.data.display import DEFAULT_COLORS
from diffex.data.images import is_image_file
from diffex.errors import DiffexError
from diffex.io.atomic import read_json
from diffex.log import warn

ORIENTATIONS = ("any", "upright")


@dataclass
class Record:
    """One image: its file, class name and (optional) group such as plate or well."""

    path: Path
    label: str
    group: str | None = None


@dataclass
class Source:
    """The images of a data set, with sorted class names and channel display info."""

    root: Path
    records: list[Record]
    classes: list[str]
    channel_names: list[str] | None = None
    channel_colors: list[str] | None = None
    extra: dict = field(default_factory=dict)
    orientation: str = "any"
    channel_roles: list[str | None] | None = None

    @property
    def has_groups(self) -> bool:
        return any(r.group is not None for r in self.records)

    def labels(self) -> list[int]:
        """Class index of every record (index into the sorted class list)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[r.label] for r in self.records]


def open_source(path: str | Path) -> Source:
    """Open a folder of class subfolders or a CSV manifest, validating what it holds."""
    path = Path(path)
    if not path.exists():
        raise DiffexError(f"data not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DiffexError(f"data must be a folder or a .csv manifest, got file {path}")
        source = _from_manifest(path)
    else:
        source = _from_folder(path)
    _read_dataset_json(source)
    return source


def _from_folder(root: Path) -> Source:
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DiffexError(f"cannot list data folder {root}: {exc.strerror or exc}") from None
    records: list[Record] = []
    skipped: list[Path] = []
    for sub in subdirs:
        for file in _walk_files(sub):
            if is_image_file(file):
                records.append(Record(file, sub.name))
            else:
                skipped.append(file)
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warn(f"skipped {len(skipped)} non-image file(s) in {root}: {names}{more}")
    if not records:
        if not subdirs:
            raise DiffexError(
                f"data folder {root} is empty: expected one subfolder of images per class"
            )
        raise DiffexError(
            f"data folder {root} holds no images (.png, .jpg, .tif) in its class subfolders"
        )
    classes = sorted({r.label for r in records})
    _check_classes(classes, root)
    return Source(root, records, classes)


def _walk_files(folder: Path) -> list[Path]:
    """All regular files below ``folder`` in sorted order; follows no symlinked folders."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append(Path(dirpath) / name)
    return out


def _from_manifest(csv_path: Path) -> Source:
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DiffexError(f"cannot read manifest {csv_path}: {exc}") from None
    for col in ("path", "label"):
        if col not in fields:
            raise DiffexError(f"manifest {csv_path} has no '{col}' column (columns: {fields})")
    group_col = next((c for c in ("group", "plate", "well", "source") if c in fields), None)
    records: list[Record] = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row["path"] or not row["label"]:
            raise DiffexError(f"manifest {csv_path} line {line}: empty path or label")
        file = Path(row["path"])
        file = file if file.is_absolute() else base / file
        if not file.is_file():
            raise DiffexError(f"manifest {csv_path} line {line}: image not found: {file}")
        group = row.get(group_col) if group_col else None
        records.append(Record(file, row["label"], group or None))
    if not records:
        raise DiffexError(f"manifest {csv_path} lists no images")
    classes = sorted({r.label for r in records})
    _check_classes(classes, csv_path)
    return Source(base, records, classes, extra={"manifest": str(csv_path)})


def _check_classes(classes: list[str], where: Path) -> None:
    if len(classes) < 2:
        found = classes[0] if classes else "none"
        raise DiffexError(f"{where} has only one class ({found}); DiffEx needs two or more")


def _read_dataset_json(source: Source) -> None:
    """Pick up channel names/colours from ``dataset.json`` beside the data when present."""
    meta_path = source.root / "dataset.json"
    if not meta_path.is_file():
        return
    meta = read_json(meta_path)
    orientation = meta.get("orientation", "any") if isinstance(meta, dict) else "any"
    if orientation not in ORIENTATIONS:
        raise DiffexError(
            f"{meta_path} orientation must be {' or '.join(ORIENTATIONS)}, got {orientation!r}"
        )
    source.orientation = orientation
    channels = meta.get("channels") if isinstance(meta, dict) else None
    if isinstance(channels, list) and channels:
        source.channel_names = [str(c.get("name", f"ch{i}")) for i, c in enumerate(channels)]
        source.channel_colors = [
            str(c.get("color", DEFAULT_COLORS[i % len(DEFAULT_COLORS)]))
            for i, c in enumerate(channels)
        ]
        source.channel_roles = [
            str(c["role"]) if isinstance(c, dict) and c.get("role") else None for c in channels
        ]
