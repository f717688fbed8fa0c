"""The interface every explained classifier satisfies (built-in or the user's own)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Classifier(Protocol):
    """An image classifier DiffEx can explain.

    Inputs are images in [-1, 1], shape (N, C, H, W); the classifier applies its own input
    normalisation. It must be frozen (eval mode) while DiffEx uses it.
    """

    class_names: list[str]
    in_channels: int
    image_size: int
    feature_dim: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores, shape (N, num_classes)."""
        ...

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax of logits / temperature), shape (N, num_classes)."""
        ...

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, shape (N, feature_dim)."""
        ...


def classifier_device(classifier: Classifier) -> torch.device:
    """Where a classifier's weights live (the CPU for a classifier without parameters)."""
    params = getattr(classifier, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")
