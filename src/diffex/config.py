"""Checked construction of config dataclasses from JSON: unknown keys, missing keys, wrong types
and out-of-range values each give one line naming the key (``where.key``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from diffex.errors import DiffexError

T = TypeVar("T")

#: Default fixed-point refinement of DDIM inversion (:func:`diffex.diffusion.ddim_encode`;
#: BENCHMARKS.md, "Exact inversion"), here because the torch-free CLI shows it too: plain
#: inversion left round trips near 25 dB with the cells' background and noise lost; up to 10
#: more UNet calls per level, a sample stopping at a largest pixel change of 0.01, reached about
#: 48 dB at 20 steps for about 3.4 times the encoding calls.
INVERSION_REFINE = 10
INVERSION_TOL = 1e-2
_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (JSON lists become tuples where needed)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _convert(value, alt, key)
            except DiffexError as exc:
                errors.append(exc)
        raise DiffexError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise DiffexError(f"{key} must be null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DiffexError(f"{key} must be an object, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DiffexError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DiffexError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise DiffexError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DiffexError(f"{key} must be a string, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise DiffexError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise DiffexError(f"{key} must have {len(args)} entries, got {len(value)}")
            items = [
                _convert(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item = args[0] if args else Any
            items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DiffexError(f"{key} must be an object, got {value!r}")
        return dict(value)
    return value


def build(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after checking keys and types; every error names ``where.key``."""
    if not isinstance(data, dict):
        raise DiffexError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DiffexError(f"{where}: unknown key {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise DiffexError(f"{where}: missing key {name!r}")
            continue
        kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except DiffexError as exc:
        raise DiffexError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise DiffexError(f"{where}: {exc}") from None


def check_positive(obj: Any, *names: str) -> None:
    """Raise naming the first field of ``obj`` that is not >= 1 (widths, depths, sizes)."""
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, tuple | list) else (value,)
        if any(v is not None and v < 1 for v in values):
            raise DiffexError(f"{name} must be >= 1, got {value}")
