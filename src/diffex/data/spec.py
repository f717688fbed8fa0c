"""The synthetic benchmark's spec: which factors shift with which condition, and by how much.

A spec is a YAML file with five top-level keys (see ``specs/default.yaml``):

- ``image_size``: rendered image size in pixels (square).
- ``channels``: list of ``{name, role, color}``; ``role`` is what the renderer draws in that
  channel (``nucleus``, ``actin``, ``spots`` or ``membrane``), ``color`` a ``#rrggbb`` colour.
- ``factors``: each factor's base distribution and ``kind`` (``causal`` or ``nuisance``).
  ``dist: normal`` takes ``mean``, ``sd``, ``min``, ``max`` (values are clipped to [min, max]);
  ``dist: uniform`` takes ``min`` and ``max``. Factors left out are held at a fixed default.
- ``conditions``: at least two condition names, each mapping causal factors to a shift of the
  factor's mean in units of its sd (``nucleus_area: 1.8`` = mean + 1.8 sd). Nuisance factors
  cannot shift: they are shared by all conditions by definition.

Lengths and areas are in pixels of a 64-px reference frame; they scale with ``image_size``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffex.errors import DiffexError

#: Rendered lengths and areas are expressed in pixels of an image this size.
REFERENCE_SIZE = 64

ROLES = ("nucleus", "actin", "spots", "membrane")
KINDS = ("causal", "nuisance")
DISTS = ("normal", "uniform")


@dataclass(frozen=True)
class FactorInfo:
    """What the renderer knows about a factor: hard limits, default value, meaning."""

    lo: float
    hi: float
    default: float
    doc: str
    integer: bool = False
    periodic: float | None = None  # period, for circular factors


#: Every factor the renderer understands, in canonical order.
KNOWN_FACTORS: dict[str, FactorInfo] = {
    "nucleus_area": FactorInfo(20, 600, 160, "nucleus area, px^2 (64-px frame)"),
    "cell_area": FactorInfo(200, 1400, 750, "cell body area, px^2 (64-px frame)"),
    "elongation": FactorInfo(1.0, 3.0, 1.5, "cell major/minor axis ratio"),
    "spot_count": FactorInfo(0, 40, 10, "number of puncta in the spots channel", integer=True),
    "actin_intensity": FactorInfo(0.0, 1.0, 0.35, "mean actin signal in the cell, before gain"),
    "rotation": FactorInfo(0, 180, 0, "long-axis angle, degrees counter-clockwise", periodic=180),
    "offset_x": FactorInfo(-10, 10, 0, "cell centre minus image centre, columns, px"),
    "offset_y": FactorInfo(-10, 10, 0, "cell centre minus image centre, rows (down), px"),
    "background": FactorInfo(0.0, 0.3, 0.06, "background offset added to every channel"),
    "noise": FactorInfo(0.0, 0.15, 0.04, "noise level (sd is noise * sqrt(0.25 + signal))"),
    "brightness": FactorInfo(0.2, 2.0, 1.0, "overall gain applied to every channel"),
}

_TOP_KEYS = {"name", "description", "image_size", "channels", "factors", "conditions"}
_CHANNEL_KEYS = {"name", "role", "color"}
_FACTOR_KEYS = {
    "normal": {"kind", "dist", "mean", "sd", "min", "max"},
    "uniform": {"kind", "dist", "min", "max"},
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
MAX_SHIFT = 10.0


@dataclass(frozen=True)
class Channel:
    """One image channel: its name, what is drawn in it, and its display colour."""

    name: str
    role: str
    color: str


@dataclass(frozen=True)
class Factor:
    """A factor's base distribution (shared by all conditions before shifts)."""

    name: str
    kind: str
    dist: str
    min: float
    max: float
    mean: float | None = None
    sd: float | None = None

    @property
    def scale(self) -> float:
        """The unit of a shift: the sd (normal) or the uniform's sd, (max - min) / sqrt(12)."""
        if self.dist == "normal":
            return float(self.sd)
        return (self.max - self.min) / math.sqrt(12.0)

    def sample(self, rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
        """Draw ``n`` values with the mean moved by ``shift`` sds; clipped (or wrapped)."""
        info = KNOWN_FACTORS[self.name]
        if self.dist == "normal":
            x = self.mean + self.sd * (shift + rng.standard_normal(n))
        else:
            x = rng.uniform(self.min, self.max, n) + shift * self.scale
        if info.periodic is not None:
            x = np.mod(x, info.periodic)
        else:
            x = np.clip(x, self.min, self.max)
        if info.integer:
            x = np.round(x)
        return x.astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "dist": self.dist}
        if self.dist == "normal":
            d.update(mean=self.mean, sd=self.sd)
        d.update(min=self.min, max=self.max)
        return d


@dataclass(frozen=True)
class SynthSpec:
    """A parsed, validated spec. ``conditions`` maps name -> {causal factor: shift in sds}."""

    image_size: int
    channels: tuple[Channel, ...]
    factors: dict[str, Factor]
    conditions: dict[str, dict[str, float]]
    name: str = "synth"
    description: str = ""
    source: str = field(default="", compare=False)

    @property
    def condition_names(self) -> list[str]:
        """Condition names, sorted (the class order everywhere in DiffEx)."""
        return sorted(self.conditions)

    @property
    def causal(self) -> list[str]:
        return [f for f, v in self.factors.items() if v.kind == "causal"]

    @property
    def nuisance(self) -> list[str]:
        return [f for f, v in self.factors.items() if v.kind == "nuisance"]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(c.role for c in self.channels)

    def shift(self, condition: str, factor: str) -> float:
        """Shift of ``factor`` in ``condition``, in sds (0 when not listed)."""
        if condition not in self.conditions:
            raise DiffexError(f"unknown condition {condition!r}; spec has {self.condition_names}")
        return float(self.conditions[condition].get(factor, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "image_size": self.image_size,
            "channels": [{"name": c.name, "role": c.role, "color": c.color} for c in self.channels],
            "factors": {k: f.to_dict() for k, f in self.factors.items()},
            "conditions": {k: dict(v) for k, v in self.conditions.items()},
        }


def default_spec_path() -> Path:
    """Path of the packaged default spec."""
    return Path(str(resources.files("diffex") / "specs" / "default.yaml"))


def packaged_spec_path(name: str) -> Path:
    """Path of a packaged example spec by stem (``default``, ``three_conditions``)."""
    p = Path(str(resources.files("diffex") / "specs" / f"{name}.yaml"))
    if not p.is_file():
        raise DiffexError(f"no packaged spec named {name!r}")
    return p


def load_spec(path: str | Path | None = None) -> SynthSpec:
    """Load and validate a spec file; ``None`` loads the packaged default."""
    p = default_spec_path() if path is None else Path(path)
    if not p.is_file():
        raise DiffexError(f"spec file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DiffexError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(data, source=str(p))


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise DiffexError(f"spec key {key}: expected a number, got {v!r}")
    return float(v)


def _mapping(v: Any, key: str) -> dict:
    if not isinstance(v, dict):
        raise DiffexError(f"spec key {key}: expected a mapping, got {type(v).__name__}")
    return v


def _unknown(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(map(str, d)) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise DiffexError(f"spec key {prefix}{extra[0]}: unknown key (allowed: {sorted(allowed)})")


def parse_spec(data: Any, source: str = "") -> SynthSpec:
    """Validate a spec given as a dict (the parsed YAML)."""
    data = _mapping(data, "<top level>")
    _unknown(data, _TOP_KEYS, "")
    for key in ("channels", "factors", "conditions"):
        if key not in data:
            raise DiffexError(f"spec key {key}: missing")

    name = data.get("name", "synth")
    description = data.get("description", "") or ""
    if not isinstance(name, str) or not isinstance(description, str):
        raise DiffexError("spec key name/description: expected a string")

    size = data.get("image_size", REFERENCE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int):
        raise DiffexError(f"spec key image_size: expected an integer, got {size!r}")
    if not 32 <= size <= 1024:
        raise DiffexError(f"spec key image_size: {size} out of range [32, 1024]")

    channels = _parse_channels(data["channels"])
    factors = _parse_factors(data["factors"])
    conditions = _parse_conditions(data["conditions"], factors)
    return SynthSpec(size, channels, factors, conditions, name, description, source)


def _parse_channels(raw: Any) -> tuple[Channel, ...]:
    if not isinstance(raw, list) or not raw:
        raise DiffexError("spec key channels: expected a non-empty list")
    out: list[Channel] = []
    for i, ch in enumerate(raw):
        key = f"channels[{i}]"
        ch = _mapping(ch, key)
        _unknown(ch, _CHANNEL_KEYS, key)
        for k in _CHANNEL_KEYS:
            if k not in ch:
                raise DiffexError(f"spec key {key}.{k}: missing")
            if not isinstance(ch[k], str):
                raise DiffexError(f"spec key {key}.{k}: expected a string, got {ch[k]!r}")
        if not _NAME_RE.match(ch["name"]):
            raise DiffexError(f"spec key {key}.name: invalid channel name {ch['name']!r}")
        if ch["role"] not in ROLES:
            raise DiffexError(f"spec key {key}.role: {ch['role']!r} is not one of {list(ROLES)}")
        if not _COLOR_RE.match(ch["color"]):
            raise DiffexError(f"spec key {key}.color: {ch['color']!r} is not #rrggbb")
        out.append(Channel(ch["name"], ch["role"], ch["color"].lower()))
    for attr in ("name", "role"):
        vals = [getattr(c, attr) for c in out]
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise DiffexError(f"spec key channels: duplicate channel {attr} {dup[0]!r}")
    return tuple(out)


def _parse_factors(raw: Any) -> dict[str, Factor]:
    raw = _mapping(raw, "factors")
    if not raw:
        raise DiffexError("spec key factors: no factors given")
    out: dict[str, Factor] = {}
    for fname, fd in raw.items():
        key = f"factors.{fname}"
        if fname not in KNOWN_FACTORS:
            raise DiffexError(f"spec key {key}: unknown factor (known: {list(KNOWN_FACTORS)})")
        fd = _mapping(fd, key)
        dist = fd.get("dist", "normal")
        if dist not in DISTS:
            raise DiffexError(f"spec key {key}.dist: {dist!r} is not one of {list(DISTS)}")
        _unknown(fd, _FACTOR_KEYS[dist], key)
        for k in _FACTOR_KEYS[dist] - {"dist"}:
            if k not in fd:
                raise DiffexError(f"spec key {key}.{k}: missing")
        kind = fd["kind"]
        if kind not in KINDS:
            raise DiffexError(f"spec key {key}.kind: {kind!r} is not one of {list(KINDS)}")
        info = KNOWN_FACTORS[fname]
        lo, hi = _num(fd["min"], f"{key}.min"), _num(fd["max"], f"{key}.max")
        if lo < info.lo or hi > info.hi:
            raise DiffexError(
                f"spec key {key}.min/max: [{lo:g}, {hi:g}] outside the allowed "
                f"[{info.lo:g}, {info.hi:g}]"
            )
        if not lo < hi:
            raise DiffexError(f"spec key {key}.min: min {lo:g} must be below max {hi:g}")
        mean = sd = None
        if dist == "normal":
            mean, sd = _num(fd["mean"], f"{key}.mean"), _num(fd["sd"], f"{key}.sd")
            if not lo <= mean <= hi:
                raise DiffexError(f"spec key {key}.mean: {mean:g} outside [min, max]")
            if not 0 < sd <= hi - lo:
                raise DiffexError(f"spec key {key}.sd: {sd:g} must be in (0, max - min]")
        out[fname] = Factor(fname, kind, dist, lo, hi, mean, sd)
    return out


def _parse_conditions(raw: Any, factors: dict[str, Factor]) -> dict[str, dict[str, float]]:
    raw = _mapping(raw, "conditions")
    if len(raw) < 2:
        raise DiffexError(f"spec key conditions: need at least 2 conditions, got {len(raw)}")
    out: dict[str, dict[str, float]] = {}
    for cname, shifts in raw.items():
        key = f"conditions.{cname}"
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            raise DiffexError(f"spec key {key}: invalid condition name (letters, digits, _ . -)")
        shifts = {} if shifts is None else _mapping(shifts, key)
        parsed: dict[str, float] = {}
        for fname, v in shifts.items():
            fkey = f"{key}.{fname}"
            if fname not in KNOWN_FACTORS:
                raise DiffexError(f"spec key {fkey}: unknown factor")
            if fname not in factors:
                raise DiffexError(f"spec key {fkey}: factor not defined under factors")
            s = _num(v, fkey)
            if factors[fname].kind == "nuisance" and s != 0:
                raise DiffexError(
                    f"spec key {fkey}: nuisance factors cannot shift between conditions "
                    "(make it causal or remove the shift)"
                )
            if abs(s) > MAX_SHIFT:
                raise DiffexError(
                    f"spec key {fkey}: shift {s:g} outside [-{MAX_SHIFT:g}, {MAX_SHIFT:g}]"
                )
            parsed[fname] = s
        out[cname] = parsed
    return out
