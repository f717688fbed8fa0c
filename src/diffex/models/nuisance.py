"""Differentiable image statistics that an explanation of a single-cell crop must leave alone.

Whatever the data, moving the cell in its frame or changing the background level is never the
phenotype: it is the imaging. These statistics are measured on images in [-1, 1] (N, C, H, W)
and are differentiable, so that the direction objective can penalise edits that change them
(``invariance_penalty``), with no knowledge of the data set's own factors:

- ``background``: mean over channels of the mean of the background pixels;
- ``centroid_x``, ``centroid_y``: the centre of the above-background intensity, in units of the
  image side (0 = centre);
- ``nucleus_gain`` (only when a channel plays the nucleus role): the mean level, above its
  background, of that channel's pixels brighter than half its peak (the mean of its brightest
  ``GAIN_SHARE`` of pixels): the nucleus's plateau, as ``diffex.data.measure`` reads it. The DNA
  stain's level is the staining and exposure gain, and the morphology readout divides other
  intensities by it, so an edit that brightens the nucleus would be read as, for example, less
  actin. The plateau, not the peak, is held: an edit can otherwise keep the few brightest
  pixels (chromocentres) and dim the rest of a growing nucleus.
- ``object_area`` (only with an area channel, the one that outlines the cell): the share of the
  frame above ``AREA_LEVEL`` of the way from that channel's background to its plateau (as
  ``nucleus_gain`` reads a plateau), through a sigmoid as wide as ``AREA_SOFTNESS`` of that
  height. A uniform change of the channel's intensity leaves it unchanged; an edit that fades
  or grows the outline does not. Unlike the others it can be the phenotype, so the directions
  stage holds it only where the real classes do not differ in it (:func:`class_separation`).

The background pixels are those of a *reference* image (the unedited one): the darkest
``BACKGROUND_SHARE`` of its pixels by smoothed channel mean, so that an edit is measured where
the unedited cell is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NAMES: tuple[str, ...] = ("background", "centroid_x", "centroid_y")
#: Share of an image's pixels taken as background (the darkest, by smoothed channel mean).
BACKGROUND_SHARE = 0.4
#: Share of the nucleus channel's pixels (the brightest) whose mean is its peak; the gain is the
#: mean of the pixels above half that peak.
GAIN_SHARE = 0.02
#: Where the object's outline sits between background (0) and plateau (1), as
#: ``diffex.data.measure`` segments a cell (0.4), and the sigmoid's width on the same scale.
AREA_LEVEL = 0.4
AREA_SOFTNESS = 0.05
#: Fewest pixels of an eroded nucleus core before the uneroded nucleus is read instead (as
#: ``diffex.data.measure`` does).
CORE_MIN_PIXELS = 4


def names(gain_channel: int | None = None, area_channel: int | None = None) -> tuple[str, ...]:
    """The statistics measured, in order: ``NAMES``, then ``nucleus_gain`` with a gain channel
    and ``object_area`` with an area channel."""
    gain = () if gain_channel is None else ("nucleus_gain",)
    area = () if area_channel is None else ("object_area",)
    return (*NAMES, *gain, *area)


def background_mask(x: Tensor, share: float = BACKGROUND_SHARE) -> Tensor:
    """(N, 1, H, W) float mask of the darkest ``share`` of each image's pixels (3x3-smoothed
    channel mean), with no gradient."""
    with torch.no_grad():
        m = F.avg_pool2d(x.float().mean(1, keepdim=True), 3, stride=1, padding=1)
        flat = m.flatten(1)
        k = max(1, int(share * flat.shape[1]))
        cut = flat.kthvalue(k, dim=1).values
        return (m <= cut[:, None, None, None]).float()


def statistics(
    x: Tensor, mask: Tensor, gain_channel: int | None = None, area_channel: int | None = None
) -> Tensor:
    """(N, S): the statistics of ``names(gain_channel, area_channel)`` (see module doc) of
    images ``x`` in [-1, 1], with the background pixels given by ``mask`` (N, 1, H, W)."""
    u = (x.float() + 1.0) / 2.0
    n, _, h, w = u.shape
    area = mask.sum((1, 2, 3)).clamp_min(1.0)
    bg_c = (u * mask).sum((2, 3)) / area[:, None]  # (N, C)
    bg = bg_c.mean(1)
    fg = F.relu(u - bg_c[:, :, None, None]).mean(1)  # (N, H, W)
    total = fg.sum((1, 2)).clamp_min(1e-6)
    ys = (torch.arange(h, device=u.device, dtype=u.dtype) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=u.device, dtype=u.dtype) + 0.5) / w - 0.5
    cx = (fg * xs[None, None, :]).sum((1, 2)) / total
    cy = (fg * ys[None, :, None]).sum((1, 2)) / total
    stats = [bg, cx, cy]
    if gain_channel is not None:
        stats.append(nucleus_plateau(u[:, gain_channel], bg_c[:, gain_channel]))
    if area_channel is not None:
        stats.append(object_area(u[:, area_channel], bg_c[:, area_channel]))
    return torch.stack(stats, 1)


def object_area(u: Tensor, bg: Tensor) -> Tensor:
    """(N,) soft share of the frame that the object of ``u`` (N, H, W) covers, above its
    background ``bg`` (N,): see ``object_area`` in the module doc. The outline's level moves with
    the plateau (with gradient), so only a change of the object's shape changes it."""
    above = u.flatten(1) - bg[:, None]
    height = nucleus_plateau(u, bg).clamp_min(1e-3)[:, None]
    return torch.sigmoid((above - AREA_LEVEL * height) / (AREA_SOFTNESS * height)).mean(1)


def class_separation(values: Tensor, y: Tensor) -> Tensor:
    """(S,) largest difference between two classes' means of each column of ``values`` (N, S),
    in pooled within-class sds (labels ``y`` (N,)); 0 with fewer than two classes."""
    classes = [c for c in torch.unique(y) if int((y == c).sum()) >= 2]
    if len(classes) < 2:
        return torch.zeros(values.shape[1])
    v = values.double()
    means = torch.stack([v[y == c].mean(0) for c in classes])
    pooled = torch.stack([v[y == c].var(0) for c in classes]).mean(0).sqrt().clamp_min(1e-12)
    return ((means[:, None] - means[None]).abs().amax((0, 1)) / pooled).float()


def nucleus_plateau(u: Tensor, bg: Tensor) -> Tensor:
    """(N,) mean level above ``bg`` (N,) of the pixels of ``u`` (N, H, W) brighter than half
    the peak (the mean of the brightest ``GAIN_SHARE``); the choice of pixels has no gradient."""
    above = u.flatten(1) - bg[:, None]
    with torch.no_grad():
        peak = above.topk(max(1, int(GAIN_SHARE * above.shape[1])), dim=1).values.mean(1)
        inside = (above > 0.5 * peak[:, None]).float()
    return (above * inside).sum(1) / inside.sum(1).clamp_min(1.0)


def nucleus_core(u: Tensor, bg: Tensor) -> Tensor:
    """(N,) mean level above ``bg`` (N,) of the nucleus's core in ``u`` (N, H, W): the pixels
    brighter than half the plateau (:func:`nucleus_plateau`), eroded by a 3x3 minimum, as
    ``diffex.data.measure`` reads ``brightness`` (the uneroded pixels where erosion leaves fewer
    than ``CORE_MIN_PIXELS``). A nucleus that grows a softer edge can keep its plateau and dim
    its core; this sees it. The choice of pixels has no gradient."""
    above = u - bg[:, None, None]
    with torch.no_grad():
        plateau = nucleus_plateau(u, bg)
        inside = (above > 0.5 * plateau[:, None, None]).float()[:, None]
        core = -F.max_pool2d(-inside, 3, stride=1, padding=1)[:, 0]
        thin = core.sum((1, 2)) < CORE_MIN_PIXELS
        core = torch.where(thin[:, None, None], inside[:, 0], core)
    return (above * core).sum((1, 2)) / core.sum((1, 2)).clamp_min(1.0)


def channel_background(x: Tensor, mask: Tensor, channel: int) -> Tensor:
    """(N,) mean of channel ``channel`` of images ``x`` in [-1, 1] over the background pixels
    ``mask`` (N, 1, H, W), in [0, 1] units."""
    u = (x[:, channel].float() + 1.0) / 2.0
    m = mask[:, 0]
    return (u * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)


def core_brightness(x: Tensor, mask: Tensor, channel: int) -> Tensor:
    """(N,) :func:`nucleus_core` of channel ``channel`` of images ``x`` in [-1, 1], above that
    channel's background on ``mask`` (N, 1, H, W), in [0, 1] units."""
    u = (x[:, channel].float() + 1.0) / 2.0
    return nucleus_core(u, channel_background(x, mask, channel))


def background_noise(x: Tensor, mask: Tensor) -> Tensor:
    """(N,) the grain of images ``x`` in [-1, 1] (N, C, H, W) on their background pixels
    ``mask`` (N, 1, H, W): the root mean square over channels of each pixel's difference from
    its 3x3 neighbourhood's mean, in [0, 1] units. A one-step estimate of x_0 is smooth, so this
    is only meaningful on full decodes."""
    u = (x.float() + 1.0) / 2.0
    local = F.avg_pool2d(u, 3, stride=1, padding=1, count_include_pad=False)
    high = (u - local) ** 2
    area = (mask.sum((1, 2, 3)) * u.shape[1]).clamp_min(1.0)
    return ((high * mask).sum((1, 2, 3)) / area).clamp_min(1e-12).sqrt()


def real_statistics(
    x: Tensor,
    gain_channel: int | None = None,
    batch_size: int = 256,
    area_channel: int | None = None,
) -> Tensor:
    """(N, S) statistics of real images ``x``, each measured on its own background."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            rows.append(statistics(xb, background_mask(xb), gain_channel, area_channel))
    return torch.cat(rows)


def natural_spread(
    x: Tensor,
    gain_channel: int | None = None,
    batch_size: int = 256,
    area_channel: int | None = None,
) -> Tensor:
    """(S,) sd of each statistic over real images ``x`` (each measured on its own background):
    the scale a change is measured against."""
    return real_statistics(x, gain_channel, batch_size, area_channel).std(0).clamp_min(1e-6)


def invariance_penalty(
    edited: Tensor,
    base: Tensor,
    spread: Tensor,
    gain_channel: int | None = None,
    area_channel: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over edits of the summed squared change of the statistics, in natural sds.

    ``edited`` (R * N, C, H, W) holds R edits of each of the N ``base`` images (rows ordered
    edit-major, as ``base.repeat(R, 1, 1, 1)``); every edit is measured on its base image's
    background pixels (``mask``, else :func:`background_mask` of ``base``). An edit that shifts
    the background by one natural sd costs 1.
    """
    r = len(edited) // len(base)
    mask = background_mask(base) if mask is None else mask
    with torch.no_grad():
        ref = statistics(base, mask, gain_channel, area_channel)
    moved = statistics(edited, mask.repeat(r, 1, 1, 1), gain_channel, area_channel)
    change = (moved - ref.repeat(r, 1)) / spread.to(moved)
    return (change**2).sum(1).mean()
