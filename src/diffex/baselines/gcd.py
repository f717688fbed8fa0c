"""Global Counterfactual Directions (GCD; Sobieski and Biecek, ECCV 2024), our reimplementation
on DiffEx's autoencoder and classifier.

GCD treats the classifier as a black box. Around one source image's semantic latent it samples
perturbations, decodes them and records the classifier's target logit and a distance to the
source; a small MLP proxy learns perturbation -> (logit, distance). Directions come from the
proxy at zero perturbation: g-directions are gradients of ``logit - lambda * distance`` for a few
weightings, h-directions the leading eigenvectors of the Hessian of the logit (for diversity).
Each direction's step is line-searched until p(target) of the source image crosses 0.5. Rounds
add samples along the directions found so far (a growing buffer) and refit the proxy.

Everything here works in standardised z (see :class:`~diffex.models.directions.LatentSpace`) with
steps in class gaps, the same units as DiffEx's alpha. The distance is the L2 distance between
the explained classifier's penultimate features of the decoded image and of the unedited
reconstruction, divided by the features' norm (no perceptual network is downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from diffex.errors import DiffexError

#: s (M, D) standardised latents of ONE source image's perturbations -> (logit_target, distance)
Oracle = Callable[[Tensor], tuple[Tensor, Tensor]]
#: a step t (class gaps) along a direction -> p(target) of the source image
ProbAlong = Callable[[float], float]


@dataclass
class GCDConfig:
    """Settings of the GCD search on one source image."""

    samples: int = 96
    rounds: int = 3
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    lambdas: tuple[float, ...] = (0.0, 1.0)
    n_hessian: int = 2
    proxy_hidden: int = 128
    proxy_steps: int = 400
    max_step: float = 4.0
    bisections: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 4 or self.rounds < 1 or self.proxy_steps < 1:
            raise DiffexError("gcd: samples must be >= 4, rounds and proxy_steps >= 1")
        if not self.scales or min(self.scales) <= 0:
            raise DiffexError(f"gcd: scales must be positive, got {self.scales}")
        if self.max_step <= 0:
            raise DiffexError(f"gcd: max_step must be > 0, got {self.max_step}")


class Proxy(nn.Module):
    """MLP from a perturbation (standardised z, in class gaps) to (target logit, distance); the
    outputs are fitted standardised and mapped back with the buffers ``mu`` and ``sd``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )  # fmt: skip
        self.register_buffer("mu", torch.zeros(2))
        self.register_buffer("sd", torch.ones(2))

    def forward(self, d: Tensor) -> Tensor:
        return self.net(d) * self.sd + self.mu


def fit_proxy(
    deltas: Tensor, logits: Tensor, dists: Tensor, hidden: int, steps: int, seed: int
) -> tuple[Proxy, dict[str, float]]:
    """Fit the proxy by full-batch Adam on standardised targets; returns it and the fit's R^2."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proxy = Proxy(deltas.shape[1], hidden)
    y = torch.stack([logits, dists], 1).float()
    proxy.mu.copy_(y.mean(0))
    proxy.sd.copy_(y.std(0).clamp_min(1e-6))
    yn = (y - proxy.mu) / proxy.sd
    opt = torch.optim.Adam(proxy.net.parameters(), lr=3e-3, weight_decay=1e-4)
    d = deltas.float()
    for _ in range(steps):
        opt.zero_grad()
        loss = ((proxy.net(d) - yn) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        resid = ((proxy.net(d) - yn) ** 2).mean(0)
    proxy.requires_grad_(False)
    return proxy, {"r2_logit": float(1 - resid[0]), "r2_distance": float(1 - resid[1])}


def g_direction(proxy: Proxy, dim: int, lam: float) -> Tensor:
    """Unit gradient at 0 of ``logit - lam * distance`` (the direction that raises the target
    fastest for that trade-off)."""
    d = torch.zeros(1, dim, requires_grad=True)
    out = proxy(d)[0]
    (grad,) = torch.autograd.grad(out[0] - lam * out[1], d)
    g = grad[0]
    return g / g.norm().clamp_min(1e-12)


def h_directions(proxy: Proxy, dim: int, n: int, probe: float) -> list[Tensor]:
    """The ``n`` eigenvectors of the Hessian of the target logit at 0 with the largest |eigenvalue|,
    each signed so that the proxy's logit rises along it (compared at +-``probe``)."""
    if n <= 0:
        return []
    hess = torch.autograd.functional.hessian(lambda d: proxy(d[None])[0, 0], torch.zeros(dim))
    vals, vecs = torch.linalg.eigh((hess + hess.T) / 2)
    order = torch.argsort(vals.abs(), descending=True)[:n]
    out = []
    with torch.no_grad():
        for i in order:
            v = vecs[:, i]
            up = proxy(torch.stack([probe * v, -probe * v]))[:, 0]
            out.append(v if up[0] >= up[1] else -v)
    return out


def line_search(prob_along: ProbAlong, max_step: float, bisections: int) -> dict[str, float | bool]:
    """Smallest step t in (0, max_step] at which p(target) crosses 0.5.

    Doubles t from ``max_step / 16`` until the crossing is bracketed, then bisects ``bisections``
    times and returns the upper end of the bracket (p >= 0.5 there). Without a crossing, returns
    ``max_step`` and ``crossed = False``.
    """
    lo, t, p = 0.0, max_step / 16, float("nan")
    while True:
        p = prob_along(t)
        if p >= 0.5:
            break
        if t >= max_step:
            return {"step": float(max_step), "p": p, "crossed": False}
        lo, t = t, min(2 * t, max_step)
    hi, p_hi = t, p
    for _ in range(bisections):
        mid = (lo + hi) / 2
        pm = prob_along(mid)
        if pm >= 0.5:
            hi, p_hi = mid, pm
        else:
            lo = mid
    return {"step": float(hi), "p": float(p_hi), "crossed": True}


def _sample(
    rng: np.random.Generator, n: int, dim: int, scales: tuple[float, ...], along: list[Tensor]
) -> Tensor:
    """Gaussian perturbations of norm about ``scale`` class gaps; with ``along`` directions, half
    of them are centred on points along those directions (GCD's later rounds)."""
    s = np.asarray(scales, dtype=np.float64)[rng.integers(0, len(scales), n)]
    d = rng.standard_normal((n, dim)) * (s / np.sqrt(dim))[:, None]
    if along:
        half = n // 2
        which = rng.integers(0, len(along), half)
        t = rng.uniform(0.25, 1.0, half) * s.max() * 2
        centre = np.stack([along[i].numpy() for i in which]) * t[:, None]
        d[:half] = centre + d[:half] * 0.5
    return torch.from_numpy(d).float()


def search(oracle: Oracle, dim: int, cfg: GCDConfig) -> dict[str, object]:
    """GCD's rounds on one source image: sample, fit the proxy, read off g- and h-directions.

    ``oracle`` maps perturbations (M, D) in class gaps to the target logit and distance of the
    decoded images. Returns the directions ``[(kind, unit vector)]`` and the proxy fits.
    """
    rng = np.random.default_rng(cfg.seed)
    deltas, logits, dists = [], [], []
    found: list[tuple[str, Tensor]] = []
    fits = []
    for r in range(cfg.rounds):
        d = _sample(rng, cfg.samples, dim, cfg.scales, [v for _, v in found])
        lg, ds = oracle(d)
        deltas.append(d)
        logits.append(lg.float().cpu())
        dists.append(ds.float().cpu())
        proxy, fit = fit_proxy(
            torch.cat(deltas), torch.cat(logits), torch.cat(dists), cfg.proxy_hidden,
            cfg.proxy_steps, cfg.seed + r,
        )  # fmt: skip
        fits.append({"round": r, "samples": int(sum(len(x) for x in deltas)), **fit})
        found = [(f"g{lam:g}", g_direction(proxy, dim, lam)) for lam in cfg.lambdas]
        found += [
            (f"h{i + 1}", v)
            for i, v in enumerate(h_directions(proxy, dim, cfg.n_hessian, min(cfg.scales)))
        ]
    return {"directions": found, "fits": fits}
