"""Diffusion math: noise schedules, forward noising and deterministic DDIM encode / decode.

Stateless functions over a :class:`Schedule`; any network can be plugged in through an
``eps_fn(x_t, t, cond) -> eps`` callable. Schedule tensors are float64; images stay in their own
dtype (normally float32), and every per-step coefficient is computed in float64 before the cast.

DDIM step schedule ("trailing" spacing): with ``S`` steps the noise levels are
``ddim_steps(T, S) = [T/S - 1, 2T/S - 1, ..., T - 1]`` plus the clean level (alpha_bar = 1).
Decoding walks from level ``S`` (t = T - 1) down to the clean image; encoding walks the same levels
upward, so ``ddim_decode(ddim_encode(x))`` reproduces ``x`` up to the model's smoothness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffex.errors import DiffexError

ScheduleKind = Literal["linear", "cosine"]
EpsFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- schedules
def make_betas(
    kind: ScheduleKind = "linear",
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Per-step noise variances beta_1..beta_T as a float64 tensor of shape (T,).

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM).
    ``cosine``: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008, betas clipped at 0.999
    (Nichol & Dhariwal); ``beta_start`` / ``beta_end`` are ignored.
    """
    if T < 1:
        raise DiffexError(f"diffusion steps T must be >= 1, got {T}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise DiffexError(f"unknown noise schedule {kind!r}; use 'linear' or 'cosine'")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A noise schedule: ``betas`` and ``alphas_cumprod`` (alpha_bar), both float64, shape (T,)."""

    betas: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        betas = betas.to(torch.float64)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0))

    @classmethod
    def from_config(
        cls,
        kind: ScheduleKind = "linear",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> Schedule:
        return cls.from_betas(make_betas(kind, T, beta_start, beta_end))

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    def abar(self, t: int) -> float:
        """alpha_bar at integer step ``t`` as a Python float (double precision)."""
        return float(self.alphas_cumprod[t])


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to (N, 1, 1, ...) in ``like``'s dtype and device."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# --------------------------------------------------------------------------- training math
def q_sample(sched: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Noised image x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    abar = sched.alphas_cumprod
    return _gather(abar.sqrt(), t, x0) * x0 + _gather((1 - abar).sqrt(), t, x0) * noise


def predict_x0(sched: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """One-step clean estimate x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = sched.alphas_cumprod
    return _gather(abar.rsqrt(), t, x_t) * x_t - _gather(((1 - abar) / abar).sqrt(), t, x_t) * eps


def eps_from_x0(sched: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """The noise mapping ``x0`` to ``x_t`` at step t: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    abar = sched.alphas_cumprod
    return (x_t - _gather(abar.sqrt(), t, x_t) * x0) * _gather((1 - abar).rsqrt(), t, x_t)


def v_target(sched: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Velocity target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho)."""
    abar = sched.alphas_cumprod
    return _gather(abar.sqrt(), t, x0) * noise - _gather((1 - abar).sqrt(), t, x0) * x0


def eps_from_v(sched: Schedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Noise implied by a velocity prediction: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    abar = sched.alphas_cumprod
    return _gather(abar.sqrt(), t, x_t) * v + _gather((1 - abar).sqrt(), t, x_t) * x_t


def sample_timesteps(
    n: int,
    T: int,
    generator: torch.Generator | None = None,
    skew: float = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` training steps in [0, T - 1] (int64).

    With u ~ U[0, 1): ``t = floor(T * (1 - (1 - u) ** (1 + skew)))``. ``skew = 0`` is uniform;
    ``skew > 0`` favours large t: the density of v = t/T is proportional to
    (1 - v) ** (-skew / (1 + skew)); skew = 1 puts about 32 % of draws in the noisiest tenth of
    steps instead of 10 %. Large t is where the decoder has to rely on z_sem. Draws on the
    generator's device, then moves to ``device``.
    """
    if skew < 0:
        raise DiffexError(f"timestep skew must be >= 0, got {skew}")
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    v = 1 - (1 - u) ** (1 + skew)
    t = (v * T).floor().long().clamp_(0, T - 1)
    return t.to(device) if device is not None else t


def snr(sched: Schedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at steps t (float32, shape (N,))."""
    abar = sched.alphas_cumprod.to(t.device)[t.long()]
    return (abar / (1 - abar)).float()


def min_snr_weight(sched: Schedule, t: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction: min(snr, gamma) / snr (float32, (N,))."""
    s = snr(sched, t)
    return s.clamp(max=gamma) / s


# --------------------------------------------------------------------------- DDIM
def ddim_steps(T: int, steps: int) -> list[int]:
    """Evenly spaced ("trailing") DDIM steps, ascending: ``[T/S - 1, ..., T - 1]`` for S steps."""
    if not 1 <= steps <= T:
        raise DiffexError(f"DDIM steps must be between 1 and T={T}, got {steps}")
    return [round((k + 1) * T / steps) - 1 for k in range(steps)]


def ddim_levels(sched: Schedule, steps: int | Sequence[int]) -> tuple[list[int], list[float]]:
    """Step list and alpha_bar per level; level 0 is the clean image (alpha_bar = 1)."""
    ts = ddim_steps(sched.T, steps) if isinstance(steps, int) else [int(s) for s in steps]
    if any(b <= a for a, b in zip(ts, ts[1:], strict=False)) or not ts:
        raise DiffexError(f"DDIM steps must be a non-empty ascending list, got {ts}")
    if ts[0] < 0 or ts[-1] >= sched.T:
        raise DiffexError(f"DDIM steps must lie in [0, {sched.T - 1}], got {ts}")
    return ts, [1.0] + [sched.abar(t) for t in ts]


def ddim_coefficients(abar_from: float, abar_to: float) -> tuple[float, float]:
    """(a, b) with x_to = a * x_from + b * eps for a deterministic DDIM move between two levels.

    Equivalent to x0_hat = (x_from - sqrt(1 - abar_from) eps) / sqrt(abar_from) followed by
    x_to = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps, computed in double precision.
    """
    a = math.sqrt(abar_to / abar_from)
    b = math.sqrt(1 - abar_to) - math.sqrt(abar_to * (1 - abar_from) / abar_from)
    return a, b


def t_batch(t: int, x: Tensor) -> Tensor:
    """The timestep t for every row of x: (N,) long on x's device."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddim_decode(
    eps_fn: EpsFn,
    x_T: Tensor,
    steps: int | Sequence[int],
    sched: Schedule,
    cond: Tensor | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Deterministic DDIM sampling (eta = 0) from ``x_T`` at step ``T - 1`` to a clean image.

    ``steps`` is a number of steps (see :func:`ddim_steps`) or an explicit ascending step list.
    The model is evaluated at each noisy level; no clipping, so the map stays invertible.
    """
    ts, abar = ddim_levels(sched, steps)
    x = x_T
    n = len(ts)
    for i, k in enumerate(range(n, 0, -1)):
        eps = eps_fn(x, t_batch(ts[k - 1], x), cond)
        a, b = ddim_coefficients(abar[k], abar[k - 1])
        x = a * x + b * eps.to(x.dtype)
        if progress is not None:
            progress(i + 1, n)
    return x


def ddim_encode(
    eps_fn: EpsFn,
    x0: Tensor,
    steps: int | Sequence[int],
    sched: Schedule,
    cond: Tensor | None = None,
    progress: Progress | None = None,
    refine: int = 0,
    tol: float = 1e-2,
) -> Tensor:
    """Deterministic DDIM inversion: walk ``x0`` up the same levels that :func:`ddim_decode` uses.

    The move from level k-1 to level k needs eps at level k, which decoding will evaluate as
    ``eps_fn(x_k, t_k)``; plain inversion (``refine=0``) approximates it by
    ``eps_fn(x_{k-1}, t_k)``: the current point at the target step. (Evaluating at the current step
    instead is about 40 times less accurate on a Gaussian-data oracle at 50 steps, because eps
    depends strongly on t near the clean end.)

    ``refine > 0`` then solves the exact inverse of the decode step by fixed-point iteration,
    ``x_k <- a x_{k-1} + b eps_fn(x_k, t_k)``, up to ``refine`` more model calls per level. Each
    sample stops once its largest pixel change falls below ``tol``, so a sample's result does not
    depend on what else is in the batch. Returns x_T at step ``T - 1``.
    """
    if refine < 0:
        raise DiffexError(f"inversion refinement must be >= 0 iterations, got {refine}")
    if not tol > 0:
        raise DiffexError(f"inversion refinement tolerance must be > 0, got {tol}")
    ts, abar = ddim_levels(sched, steps)
    x = x0
    n = len(ts)
    for k in range(1, n + 1):
        t = t_batch(ts[k - 1], x)
        a, b = ddim_coefficients(abar[k - 1], abar[k])
        x_next = a * x + b * eps_fn(x, t, cond).to(x.dtype)
        if refine:
            x_next = _fixed_point(eps_fn, x, x_next, t, cond, a, b, refine, tol)
        x = x_next
        if progress is not None:
            progress(k, n)
    return x


def _fixed_point(
    eps_fn: EpsFn,
    x_prev: Tensor,
    x: Tensor,
    t: Tensor,
    cond: Tensor | None,
    a: float,
    b: float,
    iters: int,
    tol: float,
) -> Tensor:
    """Iterate x <- a x_prev + b eps_fn(x, t), each sample until its max |change| < tol, at most
    ``iters`` times."""
    x = x.clone()
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(iters):
        c = cond[active] if cond is not None else None
        cur = x[active]
        new = a * x_prev[active] + b * eps_fn(cur, t[active], c).to(x.dtype)
        change = (new - cur).abs().flatten(1).amax(dim=1)
        x[active] = new
        active = active[change >= tol]
        if active.numel() == 0:
            break
    return x
