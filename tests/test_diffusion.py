"""Diffusion math: schedules, noising, timestep sampling and DDIM encode / decode."""

from __future__ import annotations

import pytest
import torch

from diffex.diffusion import (
    Schedule,
    ddim_decode,
    ddim_encode,
    ddim_steps,
    eps_from_x0,
    make_betas,
    min_snr_weight,
    predict_x0,
    q_sample,
    sample_timesteps,
)
from diffex.errors import DiffexError


def _x0(shape=(4, 3, 8, 8), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def _point_oracle(sched: Schedule, x0: torch.Tensor):
    """eps that a perfect model would predict if the data were the single image x0."""
    return lambda x_t, t, cond: eps_from_x0(sched, x_t, t, x0)


def _gaussian_oracle(sched: Schedule):
    """Exact eps for data ~ N(0, I): E[eps | x_t] = sqrt(1 - abar_t) x_t."""
    root = (1 - sched.alphas_cumprod).sqrt()
    return lambda x_t, t, cond: root[t].float().view(-1, 1, 1, 1) * x_t


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_shapes_and_monotonic(kind):
    betas = make_betas(kind, T=1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    sched = Schedule.from_config(kind, T=1000)
    abar = sched.alphas_cumprod
    assert sched.T == 1000 and abar.dtype == torch.float64
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] < abar[0] < 1


def test_linear_endpoints_and_bad_kind():
    betas = make_betas("linear", T=10, beta_start=1e-4, beta_end=0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    with pytest.raises(DiffexError, match="unknown noise schedule"):
        make_betas("quadratic")


def test_q_sample_and_predict_x0_are_inverse():
    sched = Schedule.from_config("linear")
    x0, noise = _x0(), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(sched, x0, t, noise)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(predict_x0(sched, x_t, t, noise), x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(eps_from_x0(sched, x_t, t, x0), noise, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        predict_x0(sched, x_t[:3], t[:3], noise[:3]), x0[:3], atol=1e-5, rtol=0
    )


def test_sample_timesteps_range_skew_and_determinism():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, g)
    assert uniform.dtype == torch.long and 0 <= uniform.min() and uniform.max() <= 999
    assert abs(uniform.float().mean().item() - 499.5) < 10
    skewed = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), skew=1.0)
    assert skewed.float().mean() > uniform.float().mean() + 100
    assert (skewed >= 900).float().mean().item() == pytest.approx(0.316, abs=0.02)
    a = sample_timesteps(8, 1000, torch.Generator().manual_seed(3), skew=0.5)
    b = sample_timesteps(8, 1000, torch.Generator().manual_seed(3), skew=0.5)
    assert torch.equal(a, b)
    with pytest.raises(DiffexError):
        sample_timesteps(4, 1000, skew=-1.0)


def test_min_snr_weight_bounded():
    sched = Schedule.from_config("linear")
    w = min_snr_weight(sched, torch.arange(0, 1000, 50), gamma=5.0)
    assert (w > 0).all() and (w <= 1).all() and w[-1] == 1


def test_ddim_steps():
    assert ddim_steps(1000, 20) == list(range(49, 1000, 50))
    assert ddim_steps(10, 10) == list(range(10))
    steps = ddim_steps(1000, 7)
    assert len(steps) == 7 and steps[-1] == 999 and steps == sorted(set(steps))
    with pytest.raises(DiffexError):
        ddim_steps(1000, 0)
    with pytest.raises(DiffexError):
        ddim_steps(10, 11)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_point_oracle_round_trip_and_decode_lands_on_x0(kind):
    sched = Schedule.from_config(kind)
    x0 = _x0()
    oracle = _point_oracle(sched, x0)
    calls = []
    x_T = ddim_encode(oracle, x0, 50, sched, progress=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (50, 50) and len(calls) == 50
    assert x_T.shape == x0.shape and x_T.dtype == torch.float32
    torch.testing.assert_close(ddim_decode(oracle, x_T, 50, sched), x0, atol=1e-4, rtol=0)
    from_noise = ddim_decode(oracle, torch.randn_like(x0), 20, sched)
    torch.testing.assert_close(from_noise, x0, atol=1e-4, rtol=0)


def test_gaussian_oracle_round_trip_needs_the_same_schedule():
    sched = Schedule.from_config("linear")
    oracle = _gaussian_oracle(sched)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    err = {}
    for steps in (20, 50):
        x_T = ddim_encode(oracle, x0, steps, sched)
        err[steps] = (ddim_decode(oracle, x_T, steps, sched) - x0).abs().max().item()
    assert err[50] < 0.02 and err[50] < err[20]
    # Inverting with 50 steps and decoding with 20 (the authors' mismatch) loses the image.
    mismatched = ddim_decode(oracle, ddim_encode(oracle, x0, 50, sched), 20, sched)
    assert (mismatched - x0).abs().max().item() > 5 * err[50]


def test_fixed_point_inversion_makes_round_trips_exact():
    """Refined inversion solves the decode step's inverse: on the Gaussian oracle its round trip
    is far closer than plain inversion's at the same number of steps."""
    sched = Schedule.from_config("linear")
    oracle = _gaussian_oracle(sched)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    err = {}
    for refine in (0, 10):
        x_T = ddim_encode(oracle, x0, 20, sched, refine=refine, tol=1e-6)
        err[refine] = (ddim_decode(oracle, x_T, 20, sched) - x0).abs().max().item()
    assert err[10] < 1e-3 and err[10] < err[0] / 20


def test_fixed_point_inversion_stops_per_sample():
    """Each sample stops on its own: a batch gives what each sample gives alone, and an eps that
    does not depend on x_t converges after one refinement call per level."""
    sched = Schedule.from_config("linear", T=100)
    root = (1 - sched.alphas_cumprod).sqrt()
    sizes: list[int] = []

    def eps_fn(x_t, t, cond):
        sizes.append(len(x_t))
        return root[t].float().view(-1, 1, 1, 1) * x_t + cond.view(-1, 1, 1, 1) * torch.sin(3 * x_t)

    x = _x0((3, 1, 4, 4))
    cond = torch.tensor([0.0, 0.5, 2.0])
    batch = ddim_encode(eps_fn, x, 10, sched, cond, refine=8, tol=1e-4)
    assert min(sizes) < 3  # samples left the batch at different iterations
    for i in range(3):
        alone = ddim_encode(eps_fn, x[i : i + 1], 10, sched, cond[i : i + 1], refine=8, tol=1e-4)
        torch.testing.assert_close(alone, batch[i : i + 1], atol=0, rtol=0)

    calls = []
    ddim_encode(lambda x_t, t, c: calls.append(1) or torch.ones_like(x_t), x, 10, sched, refine=5)
    assert len(calls) == 20
    with pytest.raises(DiffexError, match="refinement"):
        ddim_encode(eps_fn, x, 10, sched, cond, refine=-1)
    with pytest.raises(DiffexError, match="tolerance"):
        ddim_encode(eps_fn, x, 10, sched, cond, refine=2, tol=0.0)


def test_ddim_is_deterministic_and_passes_cond():
    sched = Schedule.from_config("linear", T=100)
    seen = []

    def eps_fn(x_t, t, cond):
        seen.append((t.shape, t.dtype, cond))
        return 0.1 * x_t + cond.view(-1, 1, 1, 1)

    cond = torch.tensor([0.5, -0.5])
    x = _x0((2, 1, 4, 4))
    a = ddim_decode(eps_fn, ddim_encode(eps_fn, x, 10, sched, cond), 10, sched, cond)
    b = ddim_decode(eps_fn, ddim_encode(eps_fn, x, 10, sched, cond), 10, sched, cond)
    assert torch.equal(a, b)
    assert seen[0][0] == (2,) and seen[0][1] == torch.long and seen[0][2] is cond
    with pytest.raises(DiffexError):
        ddim_decode(eps_fn, x, [5, 3], sched, cond)


def test_v_prediction_identities() -> None:
    from diffex.diffusion import Schedule, eps_from_v, predict_x0, q_sample, v_target

    sched = Schedule.from_config("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    x_t = q_sample(sched, x0, t, noise)
    v = v_target(sched, x0, t, noise)
    eps = eps_from_v(sched, x_t, t, v)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        predict_x0(sched, x_t[:5], t[:5], eps[:5]), x0[:5], atol=2e-3, rtol=1e-3
    )
