"""Latent direction models on standardised z_sem, and the latent space they act in.

An edit moves a latent ``z`` (standardised per dimension over the training set) to
``z' = z + alpha * gap * N_k(z) / ||N_k(z)||``, where ``gap`` is the distance between the class
means in standardised z: alpha is measured in class gaps, so alpha = 1 moves a cell about as far as
the average difference between conditions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffex.errors import DiffexError

DIRECTION_KINDS = ("nonlinear", "linear", "global")


@dataclass
class DirectionModelConfig:
    """Architecture of the K direction models."""

    z_dim: int
    k: int = 10
    kind: str = "nonlinear"
    hidden: int = 256
    #: rank of the data span every shift is projected onto (0: unconstrained); the basis
    #: (:func:`data_span`) is a buffer saved with the weights
    span_rank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DIRECTION_KINDS:
            raise DiffexError(
                f"direction kind {self.kind!r} must be one of {', '.join(DIRECTION_KINDS)}"
            )
        if self.k < 1:
            raise DiffexError(f"number of directions must be >= 1, got {self.k}")
        if self.z_dim < 1 or self.hidden < 1:
            raise DiffexError("z_dim and hidden must be >= 1")
        if not 0 <= self.span_rank <= self.z_dim:
            raise DiffexError(f"span_rank must be in 0..{self.z_dim}, got {self.span_rank}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatentSpace(nn.Module):
    """Standardisation of z_sem and the class geometry used to scale edits.

    Buffers: per-dimension ``mean``/``std`` over training latents, the class means in
    standardised z (``class_means``, one row per class) and ``gap``, the mean distance between
    class means (the unit of alpha).
    """

    def __init__(self, z_dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(z_dim))
        self.register_buffer("std", torch.ones(z_dim))
        self.register_buffer("class_means", torch.zeros(n_classes, z_dim))
        self.register_buffer("gap", torch.ones(()))

    @torch.no_grad()
    def fit(self, z: Tensor, y: Tensor) -> LatentSpace:
        """Fit standardisation and class geometry on training latents ``z`` with labels ``y``."""
        n_classes = self.class_means.shape[0]
        if len(z) < 2:
            raise DiffexError("need at least two latents to standardise z_sem")
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6))
        zs = self.standardise(z)
        for c in range(n_classes):
            if not (y == c).any():
                raise DiffexError(f"class index {c} has no training latents")
            self.class_means[c] = zs[y == c].mean(0)
        d = torch.cdist(self.class_means, self.class_means)
        iu = torch.triu_indices(n_classes, n_classes, 1)
        self.gap.fill_(float(d[iu[0], iu[1]].mean().clamp_min(1e-6)))
        return self

    def standardise(self, z: Tensor) -> Tensor:
        """Standardised z, on the space's device (``z`` may be anywhere)."""
        return (z.to(self.mean.device) - self.mean) / self.std

    def unstandardise(self, zs: Tensor) -> Tensor:
        """Raw z, on the space's device (``zs`` may be anywhere)."""
        return zs.to(self.mean.device) * self.std + self.mean

    def shift(
        self, z: Tensor, units: Tensor | Callable[[Tensor], Tensor], alpha: float | Tensor
    ) -> Tensor:
        """Raw z_sem moved by ``alpha`` class gaps along vectors of standardised z.

        ``units``: a (D,) or (N, D) tensor, or a map from standardised z (N, D) to vectors (unit
        vectors for directions; a longer vector moves proportionally further);
        ``alpha``: a number or one per latent (N,). The edit is computed on the space's device
        (the GPU, when there is one) and returned on ``z``'s (the decoder's input, which may be
        the encoder cache's CPU tensors): callers never move latents themselves.
        """
        zs = self.standardise(z)
        u = units(zs) if callable(units) else units.to(zs)
        a = alpha if isinstance(alpha, Tensor) else torch.tensor(float(alpha))
        a = a.to(zs).reshape(-1, 1) if a.ndim else a.to(zs)
        return self.unstandardise(zs + a * self.gap * u).to(z.device)

    def towards(self, target: int) -> Tensor:
        """Unit vector from the mean of the other classes' means to the target class mean."""
        others = [c for c in range(self.class_means.shape[0]) if c != target]
        d = self.class_means[target] - self.class_means[others].mean(0)
        return d / d.norm().clamp_min(1e-8)

    def class_direction(self, source: int, target: int) -> Tensor:
        """Unit vector from the source class mean to the target class mean (standardised z)."""
        d = self.class_means[target] - self.class_means[source]
        return d / d.norm().clamp_min(1e-8)


def data_span(zs: Tensor, share: float) -> Tensor:
    """Orthonormal rows (r, D) spanning the principal axes of standardised latents ``zs``
    (N, D) that hold ``share`` of their variance (the fewest that do, at least one).

    The semantic encoder's latents fill only a few dimensions of z_sem (on the demo about 5
    of 256 hold 99.9 % of the variance), and the decoder's weights learn only as much about a
    direction as the latents vary along it, so a shift off this span changes the images in
    ways no training image showed."""
    if not 0.0 < share <= 1.0:
        raise DiffexError(f"span share must be in (0, 1], got {share}")
    if len(zs) < 2:
        raise DiffexError("need at least two latents to find their span")
    centred = (zs - zs.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.square()
    cum = torch.cumsum(var, 0) / var.sum().clamp_min(1e-12)
    r = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype)).item()) + 1
    return vh[: min(r, len(var))].to(zs.dtype)


class _MLP(nn.Module):
    """3-layer MLP with BatchNorm and ReLU (normalised over the whole batch of latents)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class DirectionModels(nn.Module):
    """K direction models: non-linear (MLP per direction), linear (a linear map per direction)
    or global (one free vector per direction)."""

    def __init__(self, config: DirectionModelConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.k, config.z_dim
        if config.kind == "global":
            self.vectors = nn.Parameter(torch.randn(k, d))
        elif config.kind == "linear":
            self.nets = nn.ModuleList(nn.Linear(d, d) for _ in range(k))
        else:
            self.nets = nn.ModuleList(_MLP(d, config.hidden) for _ in range(k))
        if config.span_rank:
            self.register_buffer("basis", torch.zeros(config.span_rank, d))

    @property
    def k(self) -> int:
        return self.config.k

    def set_span(self, basis: Tensor) -> None:
        """Use the orthonormal rows of ``basis`` (span_rank, D) as the span of every shift."""
        if tuple(basis.shape) != (self.config.span_rank, self.config.z_dim):
            raise DiffexError(
                f"span basis of shape {tuple(basis.shape)} for span_rank "
                f"{self.config.span_rank} and z_dim {self.config.z_dim}"
            )
        with torch.no_grad():
            self.basis.copy_(basis)

    @classmethod
    def concat(cls, sets: list[DirectionModels]) -> DirectionModels:
        """One model holding every set's directions in order (set r's direction j becomes
        direction r * K + j); the sets must share their architecture."""
        first = sets[0].config
        if any(replace(m.config, k=first.k) != first for m in sets):
            raise DiffexError("direction sets of different architectures cannot be joined")
        cfg = replace(first, k=sum(m.k for m in sets))
        joined = cls(cfg).to(next(sets[0].parameters()).device)
        with torch.no_grad():
            if cfg.span_rank:
                if any(not torch.equal(m.basis, sets[0].basis) for m in sets):
                    raise DiffexError("direction sets on different data spans cannot be joined")
                joined.basis.copy_(sets[0].basis)
            if cfg.kind == "global":
                joined.vectors.copy_(torch.cat([m.vectors for m in sets]))
            else:
                nets = [net for m in sets for net in m.nets]
                for dst, src in zip(joined.nets, nets, strict=True):
                    dst.load_state_dict(src.state_dict())
        return joined

    def raw(self, zs: Tensor, k: int) -> Tensor:
        """Unnormalised output N_k(z) for standardised latents (N, D)."""
        if self.config.kind == "global":
            return self.vectors[k].expand_as(zs)
        return self.nets[k](zs)

    def unit(self, zs: Tensor, k: int) -> Tensor:
        """Unit-norm shift direction of model k at each latent (N, D), within the data span
        when there is one."""
        v = self.raw(zs, k)
        if self.config.span_rank:
            v = (v @ self.basis.T) @ self.basis
        return F.normalize(v, dim=1, eps=1e-8)

    def units(self, zs: Tensor) -> Tensor:
        """All K unit shifts, shape (K, N, D)."""
        return torch.stack([self.unit(zs, k) for k in range(self.k)])


class LatentEditor(nn.Module):
    """Direction models plus the latent space: edits raw z_sem by alpha class gaps."""

    def __init__(self, space: LatentSpace, directions: DirectionModels) -> None:
        super().__init__()
        self.space = space
        self.directions = directions

    @property
    def k(self) -> int:
        return self.directions.k

    def units(self, z: Tensor) -> Tensor:
        """(K, N, D) unit shifts (sign +, standardised) of every direction at raw latents ``z``,
        on ``z``'s device."""
        return self.directions.units(self.space.standardise(z)).to(z.device)

    def edit(self, z: Tensor, k: int, sign: int, alpha: float) -> Tensor:
        """Raw z_sem moved along direction k by ``sign * alpha`` class gaps (see
        :meth:`LatentSpace.shift`: computed on the editor's device, returned on ``z``'s)."""
        return self.space.shift(z, lambda zs: sign * self.directions.unit(zs, k), alpha)

    def edit_along(self, z: Tensor, unit: Tensor, alpha: float | Tensor) -> Tensor:
        """Raw z_sem moved along a fixed unit vector (standardised space) by alpha class gaps."""
        return self.space.shift(z, unit, alpha)
