"""Probe: where z_sem loses its rank. Prints the principal variances (each dimension standardised
over training images) of the encoder's pooled features, of its output layer, of the classifier
output that joins them, and of z_sem = z_proj([classifier output; encoder output]), with the
number of axes that hold 99.9 % of the variance; then the singular values of z_proj and how
much of the class axis (class 0's mean to class 1's, standardised z) lies in the span of z_proj's
columns for the classifier output (2 of 256 dimensions for two classes' probs or logits, as many
as the classifier has features for ``features``), and, for two classes' probs or logits, its
|cos| with their difference (the move of z when p(class 1) rises by 1 at p(class 0)'s expense).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/zsem_rank.py RUN [--images 1000]`` (RUN: a run
folder with a trained autoencoder). Numbers: BENCHMARKS.md, "Holding the cell's outline" and
"Conditioning on the classifier's features".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffex.data.loading import load_split
from diffex.models.unet import patches_in
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder


def spectrum(name: str, a: torch.Tensor) -> None:
    """Print the principal variances of ``a`` (N, D) with each column standardised."""
    a = (a - a.mean(0)) / a.std(0).clamp_min(1e-8)
    var = torch.linalg.svdvals(a) ** 2 / (len(a) - 1)
    share = var.cumsum(0) / var.sum()
    axes = int((share < 0.999).sum()) + 1
    top = ", ".join(f"{v:.1f}" for v in var[:8].tolist())
    print(f"{name:24s} dim {a.shape[1]:4d}: variances {top}; 99.9 % in {axes} axes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    ae = load_autoencoder(args.run, "cpu").eval().requires_grad_(False)
    train = load_split(RunDir(args.run).load_plan(), "train")
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))[: args.images]
    x, y = train.x[pick], torch.as_tensor(train.y)[pick]
    enc = ae.encoder
    with torch.no_grad():
        h = enc.blocks(enc.conv_in(patches_in(x, enc.config.patch_size)))
        pooled = F.silu(enc.norm_out(h)).mean(dim=(2, 3))
        out = enc.fc(pooled).float()
        cls = ae.classifier_output(x)
        z = ae.z_proj(torch.cat([cls, out], 1))
    spectrum("encoder, pooled", pooled)
    spectrum("encoder output", out)
    spectrum("classifier output", cls)
    spectrum("z_sem", z)
    sv = torch.linalg.svdvals(ae.z_proj.weight)
    print("z_proj singular values:", ", ".join(f"{v:.2f}" for v in sv[:10].tolist()), "...")
    sd = z.std(0).clamp_min(1e-8)
    axis = (z[y == 1].mean(0) - z[y == 0].mean(0)) / sd
    # The share of the class axis that the classifier output's part of z_proj can write: the
    # axis projected onto the span of those columns (standardised), for any classifier output.
    print(f"class axis: gap {float(axis.norm()):.2f} standardised units")
    if ae.cls_dim < len(axis):  # as many columns as z's dimensions span any axis
        q, _ = torch.linalg.qr(ae.z_proj.weight[:, : ae.cls_dim] / sd[:, None])
        share = float((q.T @ axis).norm() / axis.norm())
        print(f"  share of it in the span of the classifier output's columns of z_proj {share:.3f}")
    if ae.config.classifier_output != "features" and ae.cls_dim == 2:
        column = (ae.z_proj.weight[:, 1] - ae.z_proj.weight[:, 0]) / sd
        cos = float((axis @ column).abs() / (axis.norm() * column.norm()))
        print(
            f"  |cos| with the output's difference column {cos:.3f}, which moves z "
            f"{float(column.norm()):.2f} per unit of output"
        )


if __name__ == "__main__":
    main()
