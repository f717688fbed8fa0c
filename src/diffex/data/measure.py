"""Classical single-cell measurements that recover the benchmark's factors from pixels alone.

Works on any (C, H, W) float image in [0, 1] with one cell roughly centred: real crops,
generated images, or images edited by a diffusion model. Channel roles (``channels`` maps role ->
channel index; defaults match the default spec: DAPI 0, actin 1, spots 2; :func:`channel_roles`
finds them for other data, and a role no channel plays is skipped: without ``actin`` the object
is segmented from the mean of all channels, so a digit's or a photo's object gets an area,
elongation and offset too):

- ``actin``: segments the cell body (smoothed, threshold halfway between background and the cell's
  typical level, largest component, holes filled). Gives ``cell_area``, ``elongation``,
  ``rotation``, ``offset_x``, ``offset_y`` and, with the nucleus, ``actin_intensity``.
- ``nucleus``: segments the nucleus (Otsu inside the cell for a first guess, then half-way between
  background and the nuclear plateau). Gives ``nucleus_area`` and ``brightness``.
- ``spots``: counts puncta (Gaussian smoothing, white top-hat, local maxima above 5 noise sds,
  inside the cell). Gives ``spot_count``.
- every channel: ``background`` and ``noise`` from the pixels well outside the cell.

Definitions (lengths and areas in pixels of a ``reference_size`` frame, i.e. pixels for 64-px
images; pass ``reference_size=None`` for raw pixels):

- ``nucleus_area``, ``cell_area``: pixel counts of the masks.
- ``elongation``: sqrt(lambda1 / lambda2) of the cell mask's second-moment matrix (major/minor).
- ``rotation``: the cell's long-axis angle in degrees, counter-clockwise as displayed, in
  [0, 180). Axial (period 180) and meaningless for round cells: compare it on (cos 2t, sin 2t)
  and only for elongated cells.
- ``offset_x``, ``offset_y``: cell-mask centroid minus image centre (x right, y down).
- ``background``: mean over channels of the median background pixel.
- ``noise``: mean over channels of the background's sd, estimated from the half above the median
  (sqrt(2 pi) * mean(max(x - median, 0))), so that clipping at 0 and 8-bit steps do not bias it.
- ``brightness``: mean nuclear DAPI (eroded mask) above background - the overall gain, taking the
  nuclear stain as the reference.
- ``actin_intensity``: mean actin in the cell above background, divided by ``brightness`` (actin
  normalised to the DNA stain, so the overall gain cancels).
- ``spot_count``: number of puncta: local maxima of the top-hat filtered spots channel above 5
  sds of that channel's smoothed background noise. A diffusion model's copies and edits come out
  nearly noise-free, so their own noise would set a threshold about 4 times lower than a real
  image's and count faint bumps as puncta (about +45 % on round trips at 20 DDIM steps). Images
  that are compared with real ones are therefore measured with ``spot_floor``: the noise sd used
  is at least the typical noise of real images of the data set (:func:`spot_noise_floor`), so
  real and generated cells are counted with the same ruler.

A measurement that cannot be made (no cell found, no nucleus) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu

from diffex.data.spec import REFERENCE_SIZE
from diffex.errors import DiffexError

DEFAULT_CHANNELS: dict[str, int] = {"nucleus": 0, "actin": 1, "spots": 2}

#: factor name (factors.csv column) -> measurement name returned by :func:`measure_image`.
FACTOR_MEASURES: dict[str, str] = {
    "nucleus_area": "nucleus_area",
    "cell_area": "cell_area",
    "elongation": "elongation",
    "spot_count": "spot_count",
    "actin_intensity": "actin_intensity",
    "rotation": "rotation",
    "offset_x": "offset_x",
    "offset_y": "offset_y",
    "background": "background",
    "noise": "noise",
    "brightness": "brightness",
}
MEASUREMENTS: tuple[str, ...] = tuple(FACTOR_MEASURES.values())
#: Measurements the acquisition sets rather than the cell: where the cell sits in its frame, the
#: background's level and noise, and the DNA stain's gain.
IMAGING_MEASUREMENTS: tuple[str, ...] = (
    "offset_x",
    "offset_y",
    "background",
    "noise",
    "brightness",
)
#: Axial measurements (period in degrees): compare them on (cos, sin) of 2*pi*x/period.
CIRCULAR: dict[str, float] = {"rotation": 180.0}

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Smoothing before spot detection, in pixels of the reference frame.
SPOT_SIGMA = 0.7
_DISK3 = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3.0
_MIN_SPOT = 1e-3  # least tophat height counted at all
_NO_PEAKS = np.zeros(0)


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return ndi.binary_fill_holes(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(lab == sizes.argmax())


def _noise_sd(x: np.ndarray) -> float:
    """Gaussian sd from the upper half of the distribution (robust to clipping at 0)."""
    return float(noise_sd(x))


def noise_sd(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """:func:`_noise_sd` along ``axis`` (None: over all values): the sd that the ``noise``
    measurement reads from background pixels."""
    med = np.median(x, axis=axis, keepdims=True)
    return _SQRT_2PI * np.maximum(x - med, 0.0).mean(axis=axis)


#: Channel names that say which role a channel plays (lower case, matched as words).
ROLE_WORDS: dict[str, tuple[str, ...]] = {
    "nucleus": ("dapi", "hoechst", "nucleus", "nuclei", "nuclear", "dna", "draq5"),
    "actin": ("actin", "phalloidin", "f-actin", "cytoplasm", "cell", "body", "cellmask"),
    "spots": ("spots", "puncta", "foci", "spot", "granules"),
}


def channel_roles(names: list[str], declared: list[str | None] | None = None) -> dict[str, int]:
    """Which channel plays which measuring role: the roles a data set declares (``role`` in its
    ``dataset.json``), else recognised channel names (DAPI/Hoechst -> nucleus, actin/phalloidin
    -> actin, spots/puncta/foci -> spots). Roles nothing plays are left out; then the object is
    segmented from the mean of all channels and the nucleus and spot measurements are NaN."""
    roles: dict[str, int] = {}
    for i, role in enumerate(declared or []):
        if role in ROLE_WORDS and role not in roles:
            roles[role] = i
    if roles:
        return roles
    for i, name in enumerate(names):
        words = set(name.lower().replace("_", " ").replace("/", " ").split())
        for role, keys in ROLE_WORDS.items():
            if role not in roles and words & set(keys):
                roles[role] = i
    return roles


def _resolve_channels(channels: Mapping[str, int] | None, c: int) -> dict[str, int]:
    ch = dict(DEFAULT_CHANNELS if channels is None else channels)
    for role, index in ch.items():
        if not 0 <= int(index) < c:
            raise DiffexError(f"measure: channel {role}={index} but the image has {c} channels")
    return ch


def measure_image(
    img: np.ndarray,
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
    spot_sigma: float = SPOT_SIGMA,
    spot_floor: float | None = None,
) -> dict[str, float]:
    """Measure one (C, H, W) image in [0, 1]; returns ``{measurement: value}`` (see module doc).

    ``spot_sigma`` is the smoothing before spot detection, in pixels of the reference frame;
    ``spot_floor`` the least noise sd the spot threshold assumes (see ``spot_count`` above).
    """
    return _measure(img, channels, reference_size, spot_sigma, spot_floor)[0]


def _spot_threshold(noise_s: float, spot_floor: float | None) -> float:
    """Least tophat height of a punctum: 5 sds of the background noise (or of the floor)."""
    noise_t = noise_s if spot_floor is None else max(noise_s, spot_floor)
    return max(5.0 * noise_t, _MIN_SPOT)


def _measure(
    img: np.ndarray,
    channels: Mapping[str, int] | None,
    reference_size: int | None,
    spot_sigma: float,
    spot_floor: float | None,
) -> tuple[dict[str, float], float, np.ndarray]:
    """:func:`measure_image`, the spots channel's smoothed background noise sd (NaN when no
    cell or no spots channel) and the tophat heights of every candidate punctum in the cell.
    Local maxima do not depend on the threshold, so the count at any threshold is the number
    of heights above it (how :func:`measure_real` recounts without segmenting again)."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3:
        raise DiffexError(f"measure: expected a (C, H, W) image, got shape {img.shape}")
    c, h, w = img.shape
    ch = _resolve_channels(channels, c)
    px = math.sqrt(h * w)
    scale = 1.0 if reference_size is None else reference_size / px  # reference px per image px
    s = 1.0 / scale  # image px per reference px
    out = dict.fromkeys(MEASUREMENTS, float("nan"))

    # Cell body from actin (or, with no actin channel, the object in the mean of all channels).
    act = img[ch["actin"]] if "actin" in ch else img.mean(axis=0)
    act_s = ndi.gaussian_filter(act, 1.0 * s)
    if act_s.max() - act_s.min() < 1e-6:
        return out, float("nan"), _NO_PEAKS
    t0 = threshold_otsu(act_s)
    bg0 = np.median(act_s[act_s <= t0])
    level = np.median(act_s[act_s > t0])
    cell = _largest(act_s > bg0 + 0.4 * (level - bg0))
    if cell.sum() < 9:
        return out, float("nan"), _NO_PEAKS
    near = ndi.binary_dilation(cell, iterations=max(1, round(4 * s)))
    bgpix = ~near
    if bgpix.sum() < 16:  # cell fills the frame: fall back to the darkest quarter
        bgpix = act_s <= np.quantile(act_s, 0.25)
    bgs = np.array([np.median(img[k][bgpix]) for k in range(c)])
    out["background"] = float(bgs.mean())
    out["noise"] = float(np.mean([_noise_sd(img[k][bgpix]) for k in range(c)]))

    ys, xs = np.nonzero(cell)
    xs = xs + 0.5
    ys = ys + 0.5
    mx, my = xs.mean(), ys.mean()
    out["cell_area"] = float(cell.sum()) * scale**2
    out["offset_x"] = (mx - w / 2.0) * scale
    out["offset_y"] = (my - h / 2.0) * scale
    mu20 = ((xs - mx) ** 2).mean() + 1 / 12
    mu02 = ((ys - my) ** 2).mean() + 1 / 12
    mu11 = ((xs - mx) * (ys - my)).mean()
    half_tr, det = 0.5 * (mu20 + mu02), math.hypot(0.5 * (mu20 - mu02), mu11)
    out["elongation"] = math.sqrt((half_tr + det) / max(half_tr - det, 1e-9))
    phi = 0.5 * math.atan2(2.0 * mu11, mu20 - mu02)  # y-down image coordinates
    out["rotation"] = float(np.mod(-math.degrees(phi), 180.0))

    # Nucleus from DAPI.
    region = ndi.binary_dilation(cell, iterations=max(1, round(2 * s)))
    dapi = img[ch["nucleus"]] if "nucleus" in ch else None
    dapi_s = ndi.gaussian_filter(dapi, 0.7 * s) if dapi is not None else None
    vals = dapi_s[region] if dapi_s is not None else np.zeros(1)
    if dapi is not None and dapi_s is not None and vals.max() - vals.min() > 1e-6:
        n0 = region & (dapi_s > threshold_otsu(vals))
        bgn = bgs[ch["nucleus"]]
        plateau = np.median(dapi_s[n0])
        nuc = _largest(region & (dapi_s > bgn + 0.5 * (plateau - bgn)))
        if nuc.sum() >= 4:
            out["nucleus_area"] = float(nuc.sum()) * scale**2
            core = ndi.binary_erosion(nuc, iterations=max(1, round(1.5 * s)))
            core = core if core.sum() >= 4 else nuc
            out["brightness"] = float(dapi[core].mean() - bgn)
            if out["brightness"] > 1e-6 and "actin" in ch:
                act_mean = act[cell].mean() - bgs[ch["actin"]]
                out["actin_intensity"] = float(act_mean / out["brightness"])

    # Puncta.
    if "spots" not in ch:
        return out, float("nan"), _NO_PEAKS
    sp = img[ch["spots"]]
    sig = spot_sigma * s
    sp_s = ndi.gaussian_filter(sp, sig)
    noise_s = _noise_sd(sp_s[bgpix])
    tophat = ndi.white_tophat(sp_s, footprint=_DISK3 if s < 1.5 else _disk(round(3 * s)))
    peaks = peak_local_max(
        tophat,
        min_distance=1,
        threshold_abs=_MIN_SPOT,
        labels=region.astype(np.int32),
        exclude_border=False,
    )
    heights = tophat[tuple(peaks.T)] if len(peaks) else _NO_PEAKS
    out["spot_count"] = float((heights > _spot_threshold(noise_s, spot_floor)).sum())
    return out, noise_s, heights


def _disk(r: int) -> np.ndarray:
    return np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r


def _as_batch(imgs: np.ndarray, where: str) -> np.ndarray:
    imgs = np.asarray(imgs)
    if imgs.ndim != 4:
        raise DiffexError(f"{where}: expected (N, C, H, W) images, got shape {imgs.shape}")
    return imgs


def measure_batch(
    imgs: np.ndarray,
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
    spot_floor: float | None = None,
) -> dict[str, np.ndarray]:
    """Measure (N, C, H, W) images -> ``{measurement: float64 array (N,)}``; ``spot_floor`` as
    in :func:`measure_image` (pass :func:`spot_noise_floor` of real images for generated ones)."""
    imgs = _as_batch(imgs, "measure_batch")
    return _columns(
        [measure_image(im, channels, reference_size, spot_floor=spot_floor) for im in imgs]
    )


def _columns(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in MEASUREMENTS}


def spot_noise_floor(
    real: np.ndarray,
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
) -> float | None:
    """The median smoothed background noise sd of the spots channel over real (N, C, H, W)
    images in [0, 1]: the ``spot_floor`` that counts puncta in generated images with the same
    threshold as in typical real ones. None without a spots channel or a measurable cell."""
    return _measure_real(_as_batch(real, "spot_noise_floor"), channels, reference_size)[1]


def measure_real(
    real: np.ndarray,
    channels: Mapping[str, int] | None = None,
    reference_size: int | None = REFERENCE_SIZE,
) -> tuple[dict[str, np.ndarray], float | None]:
    """Measure real (N, C, H, W) images in [0, 1] with their own spot-noise floor, segmenting
    each image once: ``(measure_batch(real, spot_floor=floor), floor)`` with ``floor =
    spot_noise_floor(real)``, the ruler to measure generated images of the same data with."""
    return _measure_real(_as_batch(real, "measure_real"), channels, reference_size)


def _measure_real(
    real: np.ndarray, channels: Mapping[str, int] | None, reference_size: int | None
) -> tuple[dict[str, np.ndarray], float | None]:
    parts = [_measure(im, channels, reference_size, SPOT_SIGMA, None) for im in real]
    noise = np.array([p[1] for p in parts], dtype=np.float64)
    noise = noise[np.isfinite(noise)]
    floor = float(np.median(noise)) if noise.size else None
    for row, noise_s, heights in parts:
        if np.isfinite(row["spot_count"]):
            row["spot_count"] = float((heights > _spot_threshold(noise_s, floor)).sum())
    return _columns([p[0] for p in parts]), floor


def axial_components(deg: np.ndarray, period: float = 180.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of an axial angle with the given period, for correlating circular values."""
    t = 2.0 * np.pi * np.asarray(deg, dtype=np.float64) / period
    return np.cos(t), np.sin(t)
