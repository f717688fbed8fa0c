"""Autoencoder fidelity: pixel metrics and classifier agreement between originals and copies."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

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
