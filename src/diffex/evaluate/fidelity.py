"""Autoencoder fidelity: pixel metrics and classifier agreement between originals and copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr
from skimage.metrics import structural_similarity

from diffex.data.measure import CIRCULAR, MEASUREMENTS, measure_batch, measure_real
from diffex.models.protocol import Classifier, classifier_device


def pixel_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and MSE on the [0, 1] scale between two image batches in [-1, 1]."""
    a = ((x.float().cpu().numpy() + 1) / 2).clip(0, 1)
    b = ((y.float().cpu().numpy() + 1) / 2).clip(0, 1)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    ssim = [
        structural_similarity(ai, bi, data_range=1.0, channel_axis=0, win_size=7)
        for ai, bi in zip(a, b, strict=True)
    ]
    return {"psnr": float(psnr.mean()), "ssim": float(np.mean(ssim)), "mse": float(mse.mean())}


@torch.no_grad()
def classifier_agreement(
    classifier: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Share of images whose predicted class is unchanged, and mean KL(C(x) || C(y))."""
    device = classifier_device(classifier)
    p, q = [], []
    for i in range(0, len(x), batch_size):
        p.append(classifier.probs(x[i : i + batch_size].to(device)).float().cpu())
        q.append(classifier.probs(y[i : i + batch_size].to(device)).float().cpu())
    pp, qq = torch.cat(p), torch.cat(q)
    kl = (torch.xlogy(pp, pp) - pp * qq.clamp_min(1e-8).log()).sum(1)
    return {
        "agreement": float((pp.argmax(1) == qq.argmax(1)).float().mean()),
        "kl": float(kl.mean()),
    }


def morphology_roundtrip(
    unit_real: np.ndarray, unit_copy: np.ndarray, channels: Mapping[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """How well copies keep each measurement of the originals, both (N, C, H, W) in [0, 1].

    Per measurement (circular ones skipped): ``n`` cells measurable in both, ``real_mean``,
    ``copy_mean``, ``pct_change`` (100 * (copy_mean - real_mean) / real_mean; NaN when
    real_mean <= 0) and ``r``, the Pearson correlation between a cell's value and its copy's
    (how much of each cell's own value survives; NaN when either side is constant). An
    attribute the round trip does not keep is one no edit of the latent can be seen to change.
    Both sides count puncta with the spot-noise floor of the real images
    (:func:`diffex.data.measure.measure_real`), since copies come out nearly noise-free.
    """
    m0, floor = measure_real(unit_real, channels)
    m1 = measure_batch(unit_copy, channels, spot_floor=floor)
    out: dict[str, dict[str, Any]] = {}
    for feat in MEASUREMENTS:
        if feat in CIRCULAR:
            continue
        ok = np.isfinite(m0[feat]) & np.isfinite(m1[feat])
        a, b = m0[feat][ok], m1[feat][ok]
        row: dict[str, Any] = {"n": int(ok.sum())}
        row["real_mean"] = float(a.mean()) if len(a) else float("nan")
        row["copy_mean"] = float(b.mean()) if len(b) else float("nan")
        base = row["real_mean"]
        row["pct_change"] = (
            100.0 * (row["copy_mean"] - base) / base if np.isfinite(base) and base > 0 else np.nan
        )
        varied = len(a) >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0
        row["r"] = float(pearsonr(a, b).statistic) if varied else float("nan")
        out[feat] = row
    return out
