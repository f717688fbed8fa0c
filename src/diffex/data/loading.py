"""Turning a data source into model-ready tensors: resize, normalise, split, save the data plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffex.config import build
from diffex.data.display import DEFAULT_COLORS
from diffex.data.images import dtype_max, read_image
from diffex.data.measure import channel_roles
from diffex.data.sources import ORIENTATIONS, Record, Source, open_source
from diffex.data.splits import SPLITS, make_splits
from diffex.errors import DiffexError
from diffex.io.atomic import read_json, write_json
from diffex.log import track


@dataclass
class Normalization:
    """Per-channel percentile normalisation of [0, 1]-scaled pixels to [-1, 1].

    ``mode``: ``dataset`` (percentiles over training images, keeps intensity differences between
    images), ``image`` (percentiles per image and channel) or ``fixed`` (full pixel range).
    """

    mode: str = "dataset"
    low_pct: float = 0.1
    high_pct: float = 99.9
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in {"dataset", "image", "fixed"}:
            raise DiffexError(
                f"normalization mode must be dataset, image or fixed, got {self.mode!r}"
            )
        if not 0 <= self.low_pct < self.high_pct <= 100:
            raise DiffexError(
                "percentiles must satisfy 0 <= low < high <= 100, "
                f"got {self.low_pct}, {self.high_pct}"
            )

    def fit(self, unit: np.ndarray) -> Normalization:
        """Compute dataset percentiles per channel from (N, C, H, W) images in [0, 1]."""
        if self.mode == "dataset":
            per_ch = unit.transpose(1, 0, 2, 3).reshape(unit.shape[1], -1)
            self.low = np.percentile(per_ch, self.low_pct, axis=1).tolist()
            self.high = np.percentile(per_ch, self.high_pct, axis=1).tolist()
        else:
            self.low = [0.0] * unit.shape[1]
            self.high = [1.0] * unit.shape[1]
        return self

    def to_model(self, unit: np.ndarray) -> np.ndarray:
        """Map (N, C, H, W) images in [0, 1] to [-1, 1] with clipping."""
        if self.mode == "image":
            lo = np.percentile(unit, self.low_pct, axis=(2, 3), keepdims=True)
            hi = np.percentile(unit, self.high_pct, axis=(2, 3), keepdims=True)
        else:
            lo = np.asarray(self.low, dtype=np.float32)[None, :, None, None]
            hi = np.asarray(self.high, dtype=np.float32)[None, :, None, None]
        scaled = (unit - lo) / np.maximum(hi - lo, 1e-6)
        return (np.clip(scaled, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)

    def to_unit(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Map model-space images in [-1, 1] back to the [0, 1] pixel scale (for measurements)."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if self.mode == "image":
            return ((x + 1.0) / 2.0).astype(np.float32)
        lo = np.asarray(self.low, dtype=np.float32)[None, :, None, None]
        hi = np.asarray(self.high, dtype=np.float32)[None, :, None, None]
        return (lo + (x + 1.0) / 2.0 * (hi - lo)).astype(np.float32)


@dataclass
class DataPlan:
    """Everything needed to rebuild exactly the same tensors later: saved as ``RUN/data.json``."""

    source: str
    classes: list[str]
    channel_names: list[str]
    channel_colors: list[str]
    image_size: int
    normalization: Normalization
    splits: dict[str, list[str]]
    labels: dict[str, list[int]]
    groups: dict[str, list[str | None]] = field(default_factory=dict)
    seed: int = 0
    orientation: str = "any"
    channel_roles: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise DiffexError(
                f"orientation must be {' or '.join(ORIENTATIONS)}, got {self.orientation!r}"
            )

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    @property
    def measure_channels(self) -> dict[str, int]:
        """Channel index of each measuring role (nucleus, actin, spots) that a channel plays."""
        if self.channel_roles is not None:
            return dict(self.channel_roles)
        return channel_roles(self.channel_names)

    def save(self, path: Path) -> None:
        d = asdict(self)
        write_json(path, d)

    @classmethod
    def load(cls, path: Path) -> DataPlan:
        return build(cls, read_json(path), str(path))


@dataclass
class SplitData:
    """Model-space tensors of one split: ``x`` in [-1, 1] (N, C, H, W) and class indices ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    paths: list[str]


def load_unit_images(
    paths: list[Path], size: int, max_pixels: int | None = None, desc: str = "loading images"
) -> np.ndarray:
    """Read, centre-crop to square and resize images to (N, C, size, size) float32 in [0, 1]."""
    out: np.ndarray | None = None
    channels: int | None = None
    first: Path | None = None
    for i, path in enumerate(track(paths, desc, total=len(paths))):
        raw = read_image(path, max_pixels=max_pixels)
        if channels is None:
            channels, first = raw.shape[0], path
            out = np.empty((len(paths), channels, size, size), dtype=np.float32)
        elif raw.shape[0] != channels:
            raise DiffexError(
                f"image {path} has {raw.shape[0]} channel(s) but {first} has {channels}: "
                "all images must have the same channels"
            )
        h, w = raw.shape[1:]
        if min(h, w) < size:
            raise DiffexError(f"image {path} is {w}x{h}, smaller than the model size {size}x{size}")
        unit = raw.astype(np.float32) / dtype_max(raw.dtype)
        out[i] = crop_resize(unit, size)
    if out is None:
        raise DiffexError("no images to load")
    return out


def crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize with antialiasing."""
    h, w = img.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top : top + s, left : left + s]
    if s == size:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img))[None]
    return F.interpolate(
        t, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0].numpy()


def plan_data(
    data: str | Path,
    image_size: int,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    normalization: Normalization | None = None,
) -> tuple[DataPlan, dict[str, SplitData]]:
    """Open a data source, split it, fit the normalisation on training images, load tensors."""
    source = open_source(data)
    labels = source.labels()
    groups = [r.group for r in source.records] if source.has_groups else None
    idx = make_splits(labels, groups, fractions, seed)
    paths = [r.path for r in source.records]
    unit = load_unit_images(paths, image_size)
    norm = normalization or Normalization()
    norm.fit(unit[idx["train"]])
    n_ch = unit.shape[1]
    names = (
        source.channel_names
        if source.channel_names and len(source.channel_names) == n_ch
        else [f"channel {i}" for i in range(n_ch)]
    )
    colors = (
        source.channel_colors
        if source.channel_colors and len(source.channel_colors) == n_ch
        else (_default_colors(n_ch))
    )
    rel = [_rel(r, source) for r in source.records]
    plan = DataPlan(
        source=str(Path(data).resolve()),
        classes=source.classes,
        channel_names=names,
        channel_colors=colors,
        image_size=image_size,
        normalization=norm,
        splits={s: [rel[i] for i in idx[s]] for s in SPLITS},
        labels={s: [labels[i] for i in idx[s]] for s in SPLITS},
        groups={s: [source.records[i].group for i in idx[s]] for s in SPLITS} if groups else {},
        seed=seed,
        orientation=source.orientation,
        channel_roles=channel_roles(
            names,
            source.channel_roles
            if source.channel_roles and len(source.channel_roles) == n_ch
            else None,
        ),
    )
    model_x = norm.to_model(unit)
    tensors = {
        s: SplitData(
            torch.from_numpy(model_x[idx[s]]),
            torch.tensor(plan.labels[s], dtype=torch.long),
            plan.splits[s],
        )
        for s in SPLITS
    }
    return plan, tensors


def load_split(plan: DataPlan, split: str) -> SplitData:
    """Rebuild one split's tensors from a saved plan (the same files, size and normalisation)."""
    if split not in plan.splits:
        raise DiffexError(f"unknown split {split!r}; choose one of {', '.join(plan.splits)}")
    root = Path(plan.source)
    root = root.parent if root.is_file() else root
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in plan.splits[split]]
    unit = load_unit_images(paths, plan.image_size, desc=f"loading {split} images")
    x = torch.from_numpy(plan.normalization.to_model(unit))
    return SplitData(x, torch.tensor(plan.labels[split], dtype=torch.long), plan.splits[split])


def _rel(record: Record, source: Source) -> str:
    try:
        return str(record.path.relative_to(source.root))
    except ValueError:
        return str(record.path.resolve())


def _default_colors(n: int) -> list[str]:
    if n == 1:
        return ["#ffffff"]
    if n == 3:
        return ["#ff0000", "#00ff00", "#0000ff"]  # RGB photos show in true colour
    return [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n)]


def plan_summary(plan: DataPlan) -> dict[str, Any]:
    """Counts per split and class, for logs and reports."""
    return {
        s: {c: int(sum(1 for y in plan.labels[s] if y == i)) for i, c in enumerate(plan.classes)}
        for s in SPLITS
    }
