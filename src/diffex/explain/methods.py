"""The ranked directions of one explanation method, in one form for explain and evaluate.

A method is DiffEx itself (``RUN/ranking.json`` over the learned direction models) or a baseline
(``RUN/baselines/<name>/ranking.json`` with fixed vectors in ``directions.safetensors``). Every
direction is an :class:`Item`: a name, an edit size in class gaps and a map from standardised
latents to unit vectors, so both are edited, explained and scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffex.errors import DiffexError
from diffex.io.atomic import read_json
from diffex.io.checkpoint import load_weights
from diffex.models.directions import LatentSpace
from diffex.rundir import RunDir

METHODS = ("diffex", "gcd")
REFERENCE = "reference_class_mean"


@dataclass
class Item:
    """One direction to edit along: ``units`` maps standardised z (N, D) to unit vectors (N, D)."""

    name: str
    label: str
    alpha: float
    units: Callable[[Tensor], Tensor]
    reference: bool = False
    #: False for a learned direction the ranking did not rank, explained on request
    ranked: bool = True

    def move(self, space: LatentSpace, z: Tensor, alpha: float | None = None) -> Tensor:
        """Raw z moved by ``alpha`` (default: the item's own) class gaps along the direction."""
        a = self.alpha if alpha is None else alpha
        with torch.no_grad():
            return space.shift(z, self.units, a)


@dataclass
class DirectionSet:
    """A method's ranked directions (and, for DiffEx, the class-mean reference)."""

    method: str
    folder: Path
    ranking: dict[str, Any]
    space: LatentSpace
    items: list[Item]
    reference: Item | None

    @property
    def target(self) -> int:
        return int(self.ranking["target_index"])

    def all_items(self) -> list[Item]:
        return self.items + ([self.reference] if self.reference else [])


def method_folder(run: str | Path, method: str) -> Path:
    """Where a method keeps ranking.json, explanations/ and evaluation.json."""
    if method not in METHODS:
        raise DiffexError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    root = RunDir(run).root
    return root if method == "diffex" else root / "baselines" / method


def _constant(v: Tensor) -> Callable[[Tensor], Tensor]:
    def fn(zs: Tensor) -> Tensor:
        return v.to(zs).expand_as(zs)

    return fn


def _learned(editor: Any, k: int, sign: int) -> Callable[[Tensor], Tensor]:
    def fn(zs: Tensor) -> Tensor:
        return sign * editor.directions.unit(zs, k)

    return fn


def parse_pair(text: str) -> tuple[int, int]:
    """A learned direction and its sign from ``"8-"`` or ``"12+"``: ``(8, -1)``, ``(12, 1)``."""
    t = text.strip()
    if len(t) < 2 or t[-1] not in "+-" or not t[:-1].isdigit():
        raise DiffexError(f"--unranked {text!r}: expected a direction and sign such as 8- or 12+")
    return int(t[:-1]), 1 if t[-1] == "+" else -1


def _unranked(
    editor: Any, ranking: dict[str, Any], pairs: Sequence[tuple[int, int]], path: Path
) -> list[Item]:
    """Items for learned (direction, sign) pairs the ranking did not rank, at its alpha."""
    k_total = editor.directions.config.k
    ranked = {(int(d["direction"]), int(d["sign"])): d["rank"] for d in ranking["directions"]}
    items: list[Item] = []
    for k, sign in dict.fromkeys(pairs):  # in order, once each
        s = "+" if sign > 0 else "-"
        if not 0 <= k < k_total:
            raise DiffexError(f"direction {k}{s}: {path.parent} has directions 0 to {k_total - 1}")
        if (k, sign) in ranked:
            raise DiffexError(f"direction {k}{s} is already ranked ({ranked[k, sign]}) in {path}")
        label = f"not ranked: direction {k} ({s})"
        units = _learned(editor, k, sign)
        alpha = float(ranking["alpha"])
        items.append(Item(f"unranked_dir{k}{s}", label, alpha, units, ranked=False))
    return items


def load_space(folder: Path) -> LatentSpace:
    """A latent space saved by a baseline (``space.safetensors``)."""
    w = load_weights(folder / "space.safetensors")
    n_classes, dim = w["class_means"].shape
    space = LatentSpace(dim, n_classes)
    space.load_state_dict(w)
    return space.eval()


def load_direction_set(
    run: str | Path,
    method: str,
    device: torch.device | str = "cpu",
    reference: bool = True,
    unranked: Sequence[tuple[int, int]] = (),
) -> DirectionSet:
    """Read a method's ranking and build its items (on ``device``). ``unranked``: DiffEx's
    learned (direction, sign) pairs to add after the ranked ones although the ranking did not
    rank them (items with ``ranked`` False, at the ranking's alpha)."""
    if unranked and method != "diffex":
        raise DiffexError(f"unranked directions are DiffEx's own learned ones, not {method}'s")
    folder = method_folder(run, method)
    path = folder / "ranking.json"
    if not path.is_file():
        hint = (
            f"diffex rank --run {run}"
            if method == "diffex"
            else f"diffex baseline {method} --run {run}"
        )
        raise DiffexError(f"{folder} has no ranking.json: run '{hint}' first")
    ranking = read_json(path)
    items: list[Item] = []
    if method == "diffex":
        from diffex.train.directions import load_editor

        editor = load_editor(run, device)
        space = editor.space
        alpha = float(ranking["alpha"])
        for d in ranking["directions"]:
            k, sign = int(d["direction"]), int(d["sign"])
            s = "+" if sign > 0 else "-"
            items.append(
                Item(
                    f"rank{d['rank']}_dir{k}{s}",
                    f"rank {d['rank']}: direction {k} ({s})",
                    float(d.get("alpha", alpha)),
                    _learned(editor, k, sign),
                )
            )
        items += _unranked(editor, ranking, unranked, path)
        target = int(ranking["target_index"])
        ref = Item(
            REFERENCE,
            "reference: class-mean direction",
            float((ranking.get("reference") or {}).get("alpha", alpha)),
            _constant(space.towards(target)),
            True,
        )
        return DirectionSet(method, folder, ranking, space, items, ref if reference else None)
    space = load_space(folder).to(device)
    vectors = load_weights(folder / "directions.safetensors")["directions"].to(device)
    for d in ranking["directions"]:
        i = int(d["vector_index"])
        if not 0 <= i < len(vectors):
            raise DiffexError(f"{path}: vector_index {i} out of range ({len(vectors)} vectors)")
        items.append(
            Item(
                f"rank{d['rank']}_{d['name']}",
                f"rank {d['rank']}: {method.upper()} {d['name']}",
                float(d["step"]),
                _constant(vectors[i]),
            )
        )
    return DirectionSet(method, folder, ranking, space, items, None)
