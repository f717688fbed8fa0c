"""Contrastive objectives for discovering latent directions (LatentCLR adapted to z_sem).

Every objective maps the K * B edited rows to features ``f = normalize(phi(edit) - phi(orig))``
and applies the same loss (DESIGN.md 1.4). What ``phi`` sees decides what directions are found:

- ``paper``: a projector MLP on the latent itself (the authors' choice; it never sees images);
- ``classifier``: the explained classifier's penultimate features of the one-step decoded edit;
- ``encoder``: the semantic encoder's features of the one-step decoded edit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OBJECTIVES = ("paper", "classifier", "encoder")


class Projector(nn.Module):
    """The authors' projector P: MLP d -> 256 -> 128 with an L2-normalised output; no BatchNorm
    (per-chunk BatchNorm cancels any shift that is constant over the batch)."""

    def __init__(self, z_dim: int, hidden: int = 256, out: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, z: Tensor) -> Tensor:
        return F.normalize(self.net(z), dim=-1)


def contrastive_loss(features: Tensor, labels: Tensor, scale: float = 0.5) -> Tensor:
    """The authors' loss over N rows with direction labels.

    ``S_ij = exp(scale * |f_i . f_j|)``; ``pos_i`` = mean of S_ij over other rows of the same
    direction, ``neg_i`` = mean over rows of other directions; loss = mean_i -log(pos_i / neg_i).
    ``features`` are L2-normalised (N, F); ``labels`` (N,) direction indices.
    """
    f = F.normalize(features, dim=1, eps=1e-8)
    sim = torch.exp(scale * (f @ f.T).abs())
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=f.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    pos = (sim * pos_mask).sum(1) / pos_mask.sum(1).clamp_min(1)
    neg = (sim * neg_mask).sum(1) / neg_mask.sum(1).clamp_min(1)
    return -(pos / neg).log().mean()


def contrastive_accuracy(features: Tensor, labels: Tensor) -> float:
    """Share of rows whose nearest other row (by |cosine|) belongs to the same direction."""
    f = F.normalize(features, dim=1, eps=1e-8)
    sim = (f @ f.T).abs()
    sim.fill_diagonal_(-1.0)
    return float((labels[sim.argmax(1)] == labels).float().mean())


def decorrelation_penalty(units: Tensor) -> Tensor:
    """Mean squared off-diagonal cosine between the K shift vectors of each sample.

    ``units`` (K, N, D) unit vectors; 0 when the K shifts are orthogonal at every sample.
    """
    k = units.shape[0]
    if k < 2:
        return units.new_zeros(())
    gram = torch.einsum("knd,jnd->nkj", units, units)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return (off**2).sum((1, 2)).mean() / (k * (k - 1))
