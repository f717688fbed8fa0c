"""The artifact guard: edits that move the classifier by changing the imaging, not the cell.

An edit that mainly adds speckle / high-frequency energy, changes the background level or its
noise, or (when a channel plays the nucleus role) changes the DNA stain's gain is measured
against the unedited reconstruction, in units of the natural spread of each quantity over real
images, and flagged from a few sds (see shared/calibration: the best-ranked direction of the
published objective added noise). The rank stage keeps flagged edits out of the ranking; the
explain stage marks flagged frames of a sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from diffex.data.measure import IMAGING_MEASUREMENTS
from diffex.errors import DiffexError
from diffex.models.nuisance import nucleus_plateau

#: Quantities compared between edit and reconstruction (see :func:`artifact_measures`).
ARTIFACT_QUANTITIES: tuple[str, ...] = ("high_frequency", "background", "noise")
#: Added to them when a channel plays the nucleus role.
GAIN_QUANTITY = "stain_gain"
_LABELS = {
    "high_frequency": "high-frequency energy",
    "background": "background",
    "noise": "noise",
    GAIN_QUANTITY: "stain gain",
}
#: Spatial frequency (cycles per pixel) above which energy counts as high-frequency.
HF_CUTOFF = 0.3


def _as_nchw(x: Any, name: str) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 4:
        raise DiffexError(f"{name}: expected (N, C, H, W) images in [0, 1], got shape {a.shape}")
    return a.astype(np.float64)


def _hf_log_energy(a: np.ndarray) -> np.ndarray:
    """log of the mean spectral energy above HF_CUTOFF cycles/px, summed over channels -> (N,)."""
    h, w = a.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    high = np.hypot(fy, fx) > HF_CUTOFF
    spec = np.fft.rfft2(a - a.mean(axis=(-2, -1), keepdims=True), norm="ortho")
    e = (np.abs(spec) ** 2)[..., high].sum(axis=-1)  # (N, C)
    return np.log(e.sum(axis=1) / (h * w) + 1e-12)


def _object_mask(a: np.ndarray) -> np.ndarray:
    """(H, W) foreground mask of one (C, H, W) image: smoothed channel mean above Otsu, dilated."""
    h, w = a.shape[-2:]
    sm = ndi.gaussian_filter(a.mean(axis=0), max(1.0, min(h, w) / 32))
    if sm.max() - sm.min() < 1e-6:
        return np.zeros((h, w), dtype=bool)
    fg = sm > threshold_otsu(sm)
    return ndi.binary_dilation(fg, iterations=max(1, round(min(h, w) / 16)))


def _upper_half_sd(x: np.ndarray) -> float:
    med = np.median(x)
    return float(np.sqrt(2.0 * np.pi) * np.maximum(x - med, 0.0).mean())


def _background_stats(
    a: np.ndarray, mask_from: np.ndarray | None = None, gain_channel: int | None = None
) -> tuple[float, float, float]:
    """(level, noise, gain_bg) of one (C, H, W) image: the channel means of the median and sd
    of the pixels outside the object, and the median of ``gain_channel``'s own background
    pixels (NaN without a gain channel)."""
    fg = _object_mask(a)
    if mask_from is not None:
        fg |= _object_mask(mask_from)
    bg = ~fg
    if bg.sum() < max(16, 0.05 * bg.size):  # object fills the frame: darkest quarter instead
        sm = ndi.gaussian_filter(a.mean(axis=0), 1.0)
        bg = sm <= np.quantile(sm, 0.25)
    medians = [float(np.median(ch[bg])) for ch in a]
    noise = float(np.mean([_upper_half_sd(ch[bg]) for ch in a]))
    gain_bg = float("nan") if gain_channel is None else medians[gain_channel]
    return float(np.mean(medians)), noise, gain_bg


def _image_quantities(
    a: np.ndarray, other: np.ndarray | None = None, gain_channel: int | None = None
) -> dict[str, np.ndarray]:
    stats = [
        _background_stats(a[i], None if other is None else other[i], gain_channel)
        for i in range(len(a))
    ]
    out = {
        "high_frequency": _hf_log_energy(a),
        "background": np.array([s[0] for s in stats]),
        "noise": np.array([s[1] for s in stats]),
    }
    if gain_channel is not None:  # the nucleus's plateau, as the invariance penalty holds it
        bg = torch.tensor([s[2] for s in stats], dtype=torch.float64)
        out[GAIN_QUANTITY] = nucleus_plateau(torch.from_numpy(a[:, gain_channel]), bg).numpy()
    return out


def _check_gain_channel(gain_channel: int | None, channels: int, name: str) -> None:
    if gain_channel is not None and not 0 <= gain_channel < channels:
        raise DiffexError(f"{name}: gain channel {gain_channel} out of range 0..{channels - 1}")


def artifact_measures(
    recon_unit: Any, edited_unit: Any, gain_channel: int | None = None
) -> dict[str, np.ndarray]:
    """Per-image change from the unedited reconstruction to the edit, both (N, C, H, W) in [0, 1].

    - ``high_frequency``: change of the log energy above 0.3 cycles/px (all channels), i.e. a
      relative change (+0.69 = doubled). Speckle noise is white and lands mostly there; cell
      structure, even small puncta, is mostly below it.
    - ``background``: change of the median of the pixels outside the object (mean over channels).
    - ``noise``: change of the background's sd (upper-half estimator, robust to clipping at 0).
    - ``stain_gain`` (only with ``gain_channel``, the nucleus channel): change of that channel's
      plateau above its background (the DNA stain's gain, which the morphology readout divides
      other intensities by).

    The background region is the same for both images of a pair: outside the union of the
    object masks (smoothed channel mean above Otsu, dilated) of the reconstruction and the edit,
    so a cell that grows does not count as a brighter background.
    """
    a = _as_nchw(recon_unit, "artifact_measures")
    b = _as_nchw(edited_unit, "artifact_measures")
    if a.shape != b.shape:
        raise DiffexError(f"artifact_measures: shapes differ, {a.shape} vs {b.shape}")
    _check_gain_channel(gain_channel, a.shape[1], "artifact_measures")
    qa = _image_quantities(a, b, gain_channel)
    qb = _image_quantities(b, a, gain_channel)
    return {k: qb[k] - qa[k] for k in qa}


def reference_spread(real_unit: Any, gain_channel: int | None = None) -> dict[str, float]:
    """Natural spread over real images of each artifact quantity (robust sd: IQR / 1.349).

    Compute it on a few hundred real images (any class) in [0, 1]. A spread of zero (identical
    images) is replaced by a small floor so that z-scores stay finite.
    """
    a = _as_nchw(real_unit, "reference_spread")
    if len(a) < 2:
        raise DiffexError("reference_spread needs at least 2 real images")
    _check_gain_channel(gain_channel, a.shape[1], "reference_spread")
    q = _image_quantities(a, gain_channel=gain_channel)
    out = {}
    for k, v in q.items():
        sd = float(np.subtract(*np.percentile(v, [75, 25])) / 1.349)
        if not sd > 0:
            sd = float(np.std(v))
        out[k] = max(sd, 1e-6)
    return out


#: Default flag thresholds, in units of the natural spread over real images.
Z_THRESH = 3.0
Z_THRESH_SMOOTHING = 6.0


def artifact_z(measures: Mapping[str, np.ndarray], spread: Mapping[str, float]) -> dict[str, float]:
    """Mean change of each quantity over the edited images, in units of the natural spread
    (``stain_gain`` too when both were measured with a gain channel)."""
    out = {}
    extra = (GAIN_QUANTITY,) if GAIN_QUANTITY in measures else ()
    for k in ARTIFACT_QUANTITIES + extra:
        if k not in measures or k not in spread:
            raise DiffexError(f"artifact measures / reference spread lack {k!r}")
        v = np.asarray(measures[k], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean() / spread[k]) if v.size else float("nan")
    return out


def artifact_flags(
    measures: Mapping[str, np.ndarray],
    spread: Mapping[str, float],
    z_thresh: float = Z_THRESH,
    z_thresh_smoothing: float = Z_THRESH_SMOOTHING,
) -> list[str]:
    """Flags for an edit whose mean change is large against the natural spread over real images.

    An increase of high-frequency energy or background noise, or a change of the background
    level or the stain gain in either direction, of at least ``z_thresh`` sds is flagged; a
    decrease of high-frequency energy or noise (smoothing: diffusion decoders smooth a little,
    and a real phenotype edit may too) only from ``z_thresh_smoothing`` sds. Example flag:
    ``"high-frequency energy +4.1 sd"``.
    """
    return flags_from_z(artifact_z(measures, spread), z_thresh, z_thresh_smoothing)


def flags_from_z(
    z_scores: Mapping[str, float],
    z_thresh: float = Z_THRESH,
    z_thresh_smoothing: float = Z_THRESH_SMOOTHING,
) -> list[str]:
    """:func:`artifact_flags` from z-scores already computed by :func:`artifact_z`."""
    flags = []
    for k, z in z_scores.items():
        if not np.isfinite(z):
            continue
        if k in ("background", GAIN_QUANTITY):
            hit = abs(z) >= z_thresh
        else:
            hit = z >= z_thresh or z <= -z_thresh_smoothing
        if hit:
            flags.append(f"{_LABELS[k]} {z:+.1f} sd")
    return flags


def sweep_checks(
    frames_unit: Any,
    alphas: Any,
    spread: Mapping[str, float],
    gain_channel: int | None = None,
    z_thresh: float = Z_THRESH,
    z_thresh_smoothing: float = Z_THRESH_SMOOTHING,
) -> list[dict[str, Any]]:
    """The guard on every frame of a sweep: ``frames_unit`` (A, N, C, H, W) in [0, 1] at
    ``alphas`` (A,), each alpha's frames measured against the unedited ones (the alpha closest
    to 0). One ``{"alpha", "artifacts_sd", "flags"}`` per alpha, in order: a flagged frame
    shows the decoder changing the imaging (for example far from the data, where it was never
    trained), not the cell."""
    f = np.asarray(
        frames_unit.detach().cpu() if isinstance(frames_unit, torch.Tensor) else frames_unit
    )
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if f.ndim != 5 or len(f) != len(a):
        raise DiffexError(f"sweep_checks: {len(a)} alphas for frames of shape {f.shape}")
    zero = int(np.argmin(np.abs(a)))
    out = []
    for j, alpha in enumerate(a):
        z = artifact_z(artifact_measures(f[zero], f[j], gain_channel), spread)
        flags = [] if j == zero else flags_from_z(z, z_thresh, z_thresh_smoothing)
        out.append({"alpha": float(alpha), "artifacts_sd": z, "flags": flags})
    return out


def flagged_frames(checks: list[dict[str, Any]] | None) -> list[str]:
    """One line per flagged frame of :func:`sweep_checks`' output: ``"alpha -2.5: stain gain
    -8.6 sd"``."""
    return [
        f"alpha {c['alpha']:+.3g}: {', '.join(c['flags'])}" for c in checks or [] if c.get("flags")
    ]


#: |Spearman rho| along a sweep from which an imaging measurement counts as drifting (the
#: benchmark's line for a nuisance factor, BENCHMARKS.md).
DRIFT_RHO = 0.3


def imaging_drift(rows: list[dict[str, Any]], threshold: float = DRIFT_RHO) -> list[str]:
    """Imaging measurements that follow alpha along a sweep, from an explanation's morphology
    rows (``feature``, ``rho_alpha`` over the whole sweep, ``rho_forward`` over its half
    towards the target): ``"brightness rho +0.36 (towards the target -0.11)"`` for each one of
    :data:`diffex.data.measure.IMAGING_MEASUREMENTS` at ``threshold`` or more on either. Unlike
    a flagged frame, a drift can stay within the natural spread at every frame and still move
    steadily with the edit: part of what the sweep shows is then the imaging, not the cell."""
    out = []
    for r in rows:
        if r.get("feature") not in IMAGING_MEASUREMENTS:
            continue
        whole, forward = (float(r.get(k, float("nan"))) for k in ("rho_alpha", "rho_forward"))
        if any(np.isfinite(v) and abs(v) >= threshold for v in (whole, forward)):
            half = f" (towards the target {forward:+.2f})" if np.isfinite(forward) else ""
            out.append(f"{r['feature']} rho {whole:+.2f}{half}")
    return out
