"""The image statistics the direction objective keeps still, and the invariance penalty."""

from __future__ import annotations

import pytest
import torch

from diffex.models.nuisance import (
    background_mask,
    background_noise,
    class_separation,
    core_brightness,
    invariance_penalty,
    names,
    natural_spread,
    object_area,
    statistics,
)


def cell(shift: int = 0, background: float = 0.1, size: int = 32) -> torch.Tensor:
    """One (1, 3, size, size) image in [-1, 1]: a bright 8x8 square on a flat background, the
    square ``shift`` pixels right of centre."""
    u = torch.full((1, 3, size, size), background)
    c = size // 2 + shift
    u[:, :, size // 2 - 4 : size // 2 + 4, c - 4 : c + 4] = 0.8
    return u * 2 - 1


def test_statistics_see_the_background_and_where_the_cell_is() -> None:
    base = cell()
    mask = background_mask(base)
    assert float(mask.sum()) >= 0.4 * 32 * 32  # at least the darkest 40 % (ties all count)
    assert float((mask[0, 0, 12:20, 12:20]).sum()) == 0.0  # the cell is never background
    bg, cx, cy = statistics(base, mask)[0].tolist()
    assert bg == pytest.approx(0.1, abs=1e-6)
    assert cx == pytest.approx(0.0, abs=1e-6) and cy == pytest.approx(0.0, abs=1e-6)
    moved = statistics(cell(shift=4), mask)[0]
    assert float(moved[1]) == pytest.approx(4 / 32, abs=1e-5)  # centroid in image sides
    assert float(moved[2]) == pytest.approx(0.0, abs=1e-6)
    brighter = statistics(cell(background=0.15), mask)[0]
    assert float(brighter[0]) == pytest.approx(0.15, abs=1e-6)
    assert float(brighter[1]) == pytest.approx(0.0, abs=1e-6)


def test_invariance_penalty_is_the_squared_change_in_natural_sds() -> None:
    base = torch.cat([cell(), cell(background=0.05)])
    spread = torch.tensor([0.05, 0.1, 0.1])
    same = invariance_penalty(base.repeat(3, 1, 1, 1), base, spread)
    assert float(same) == pytest.approx(0.0, abs=1e-9)
    # two edits of each image: the first lifts the background by 0.05 (1 sd), the second
    # moves the cell 1 px right (1/32 side = 1.25 sd), within the rim that the smoothed mask
    # leaves around the cell, so the background it is measured on stays background
    spread = torch.tensor([0.05, 0.025, 0.025])
    lifted = torch.cat([cell(background=0.15), cell(background=0.10)])
    moved = torch.cat([cell(shift=1), cell(shift=1, background=0.05)])
    edited = torch.cat([lifted, moved]).requires_grad_(True)
    pen = invariance_penalty(edited, base, spread)
    assert float(pen.detach()) == pytest.approx((1.0 + 1.25**2) / 2, rel=1e-4)
    pen.backward()
    assert edited.grad is not None and float(edited.grad.abs().sum()) > 0


def test_natural_spread_is_the_sd_over_real_images() -> None:
    imgs = torch.cat([cell(background=b) for b in (0.05, 0.1, 0.15)])
    sd = natural_spread(imgs, batch_size=2)
    assert float(sd[0]) == pytest.approx(0.05, rel=1e-4)
    assert float(sd[1]) == pytest.approx(1e-6)  # no cell moved: floored, never zero


def test_nucleus_gain_is_the_nucleus_channel_level_above_background() -> None:
    base = cell()
    mask = background_mask(base)
    stats = statistics(base, mask, gain_channel=0)[0]
    assert stats.shape == (4,)
    assert float(stats[3]) == pytest.approx(0.8 - 0.1, abs=1e-6)
    # a bigger cell at the same level keeps its gain; the same cell twice as bright doubles it
    bigger = cell()
    bigger[:, :, 11:21, 11:21] = 0.8 * 2 - 1  # grows into the rim the mask leaves
    assert float(statistics(bigger, mask, 0)[0, 3]) == pytest.approx(0.7, abs=1e-6)
    brighter = cell()
    brighter[:, 0, 12:20, 12:20] = 1.5 * 2 - 1
    assert float(statistics(brighter, mask, 0)[0, 3]) == pytest.approx(1.4, abs=1e-6)
    # only the named channel counts, and the penalty prices it in its own sd
    dimmer_actin = base.clone()
    dimmer_actin[:, 1, 12:20, 12:20] = 0.4 * 2 - 1
    spread = torch.tensor([0.05, 0.1, 0.1, 0.35])
    assert float(invariance_penalty(dimmer_actin, base, spread, 0)) == pytest.approx(0, abs=1e-9)
    assert float(invariance_penalty(brighter, base, spread, 0)) == pytest.approx(4.0, rel=1e-4)


def test_nucleus_gain_is_the_plateau_not_the_brightest_foci() -> None:
    """A nucleus that grows and dims while its few brightest pixels (chromocentres) stay as they
    are changes its gain: the level of every pixel above half the peak counts, not the peak."""

    def nucleus(half: int, level: float) -> torch.Tensor:
        u = torch.full((1, 3, 32, 32), 0.1)
        u[:, 0, 16 - half : 16 + half, 16 - half : 16 + half] = level
        u[:, 0, 14:18, 14:19] = 0.8  # 20 px of foci = the brightest 2 % of 1024
        return u * 2 - 1

    base, grown = nucleus(4, 0.6), nucleus(5, 0.5)
    mask = background_mask(base)
    assert float(statistics(base, mask, 0)[0, 3]) == pytest.approx((44 * 0.5 + 20 * 0.7) / 64)
    assert float(statistics(grown, mask, 0)[0, 3]) == pytest.approx((80 * 0.4 + 20 * 0.7) / 100)


def disk(radius: float, level: float, size: int = 32) -> torch.Tensor:
    """(1, 3, size, size) image in [-1, 1]: background 0.1 and, in channel 1, a centred disk of
    ``radius`` px at ``level`` (channels 0 and 2 a fixed small square)."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= radius**2
    u = torch.full((1, 3, size, size), 0.1)
    u[0, 1][inside] = level
    u[:, 0::2, 14:18, 14:18] = 0.7
    return u * 2 - 1


def test_object_area_is_the_outlined_share_whatever_the_intensity() -> None:
    """The outlined area is the object's share of the frame (soft, so a little off the pixel
    count), does not move when the channel dims as a whole, and shrinks with the object."""
    base = disk(8, 0.6)
    mask = background_mask(base)
    assert names(0, 1) == ("background", "centroid_x", "centroid_y", "nucleus_gain", "object_area")
    stats = statistics(base, mask, gain_channel=0, area_channel=1)[0]
    assert stats.shape == (5,)
    pixels = float(((base[0, 1] + 1) / 2 > 0.3).float().mean())
    assert float(stats[4]) == pytest.approx(pixels, rel=0.05)
    dimmer = statistics(disk(8, 0.3), mask, 0, 1)[0, 4]
    assert float(dimmer) == pytest.approx(float(stats[4]), rel=1e-4)
    smaller = statistics(disk(6, 0.6), mask, 0, 1)[0, 4]
    assert float(smaller) == pytest.approx(float(stats[4]) * 36 / 64, rel=0.1)
    # the penalty prices the shrinking in its own sd and has a gradient
    edited = disk(6, 0.6).requires_grad_(True)
    spread = torch.tensor([1.0, 1.0, 1.0, 1.0, float(stats[4] - smaller)])
    pen = invariance_penalty(edited, base, spread, 0, 1)
    assert float(pen.detach()) == pytest.approx(1.0, rel=0.05)
    pen.backward()
    assert edited.grad is not None and float(edited.grad.abs().sum()) > 0
    u = (base[:, 1] + 1) / 2
    assert object_area(u, torch.full((1,), 0.1)).shape == (1,)


def test_class_separation_is_the_largest_mean_difference_in_pooled_sds() -> None:
    values = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 7.0], [6.0, 7.0], [1.0, 1.0], [3.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    sep = class_separation(values, y)
    # column 0: means 1, 5, 2 with within-class variance 2 each: (5 - 1) / sqrt(2)
    assert float(sep[0]) == pytest.approx(4 / 2**0.5, rel=1e-5)
    # column 1: means 5, 7, 2, variances 0, 0, 2: pooled sd sqrt(2 / 3)
    assert float(sep[1]) == pytest.approx(5 / (2 / 3) ** 0.5, rel=1e-5)
    assert float(class_separation(values, torch.zeros(6, dtype=torch.long))[0]) == 0.0


def test_background_noise_is_the_grain_on_the_background_only() -> None:
    """Zero on a flat background whatever its level; for white noise of sd s it reads
    s * sqrt(8/9) (each pixel's difference from its 3x3 mean), and a cell in the foreground,
    outside the mask, does not count."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 48, 48), -0.8)
    mask = torch.zeros(2, 1, 48, 48)
    mask[:, :, :, :20] = 1.0
    assert background_noise(flat, mask).abs().max() < 1e-5
    sd = 0.05  # in [0, 1] units: 0.1 in [-1, 1]
    noisy = flat + 2 * sd * torch.randn(flat.shape, generator=g)
    got = background_noise(noisy, mask)
    assert torch.allclose(got, torch.full((2,), sd * (8 / 9) ** 0.5), rtol=0.05)
    with_cell = noisy.clone()
    with_cell[:, :, 10:40, 24:44] = 0.9 * torch.rand(2, 3, 30, 20, generator=g)
    assert torch.allclose(background_noise(with_cell, mask), got)


def test_core_brightness_reads_the_eroded_nucleus_not_its_rim() -> None:
    """The nucleus core's brightness is the mean, above background, of the pixels above half
    the plateau eroded by one pixel (as the readout's ``brightness``): a dim rim that lowers the
    plateau is not in it, and its gradient reaches the core's pixels and no rim pixel."""
    u = torch.full((1, 3, 32, 32), 0.1)
    u[:, 0, 11:21, 11:21] = 0.6  # rim: 0.5 above the background
    u[:, 0, 12:20, 12:20] = 0.9  # core: 0.8 above it
    x = (u * 2 - 1).requires_grad_(True)
    mask = background_mask(x)
    plateau = float(statistics(x.detach(), mask, 0)[0, 3])
    assert plateau == pytest.approx((64 * 0.8 + 36 * 0.5) / 100, rel=1e-5)
    core = core_brightness(x, mask, 0)
    assert float(core.detach()[0]) == pytest.approx(0.8, rel=1e-5)
    core.sum().backward()
    grad = x.grad[0, 0]
    assert bool((grad[13:19, 13:19] > 0).all())
    assert float(grad[11, 11:21].abs().sum()) == 0.0
