"""Offline feature spaces for realism: the explained classifier's penultimate layer, and an
ImageNet network (EfficientNet-Lite0) on the false-colour composite."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffex.data.display import DEFAULT_COLORS, hex_to_rgb
from diffex.models.efficientnet import INPUT_SIZE, imagenet_features
from diffex.models.protocol import Classifier, classifier_device


def rgb_composite(x: torch.Tensor, colors: Sequence[str] | None = None) -> torch.Tensor:
    """(N, C, H, W) model-space images in [-1, 1] -> (N, 3, H, W) additive false-colour RGB in
    [0, 1], the same composite the figures show (channel c painted in ``colors[c]``)."""
    c = x.shape[1]
    colors = list(colors or [])[:c] or [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(c)]
    if len(colors) < c:
        colors += [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(colors), c)]
    rgb = torch.from_numpy(np.stack([hex_to_rgb(col) for col in colors])).to(x.device)
    unit = ((x.float() + 1) / 2).clamp(0, 1)
    return torch.einsum("nchw,ck->nkhw", unit, rgb).clamp(0, 1)


@torch.no_grad()
def classifier_features(
    classifier: Classifier, x: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Penultimate features of the explained classifier, (N, feature_dim)."""
    device = classifier_device(classifier)
    out = [
        classifier.features(x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float64)


def imagenet_space(
    x: torch.Tensor, colors: Sequence[str] | None = None, size: int = INPUT_SIZE
) -> np.ndarray:
    """EfficientNet-Lite0 features of the composite, resized to ``size`` px, (N, 1280)."""
    return imagenet_features(rgb_composite(x, colors), size=size).numpy().astype(np.float64)
