"""Micro-benchmark: one directions training step (all K edits of a batch one-step decoded,
classifier features, invariance penalty, backward) on a trained run, in fp32 and under bf16
autocast, and how far the bf16 step's loss and gradients are from the fp32 step's.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_directions_cpu.py RUN [--k 10]
[--batch 8] [--repeats 5] [--threads 2]`` (RUN: a run folder with a trained autoencoder).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffex.data.loading import load_split
from diffex.models.contrastive import contrastive_loss
from diffex.models.directions import (
    DirectionModelConfig,
    DirectionModels,
    LatentEditor,
    LatentSpace,
)
from diffex.models.nuisance import natural_spread
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import DirectionTrainer, edit_features, semantic_latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rd = RunDir(args.run)
    plan = rd.load_plan()
    ae = load_autoencoder(args.run, "cpu").eval().requires_grad_(False)
    train = load_split(plan, "train")
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))[:256]
    x = train.x[pick]
    z = semantic_latents(ae, x)
    space = LatentSpace(z.shape[1], len(plan.classes)).fit(z, train.y[pick])
    gain = plan.measure_channels.get("nucleus")
    spread = natural_spread(x, gain)
    torch.manual_seed(0)
    dcfg = DirectionModelConfig(z_dim=z.shape[1], k=args.k, kind="nonlinear", hidden=256)
    trainer = DirectionTrainer(LatentEditor(space, DirectionModels(dcfg)), "classifier", z.shape[1])
    zb, xb = z[: args.batch], x[: args.batch]

    def step(bf16: bool, noise_seed: int = 1) -> tuple[float, torch.Tensor]:
        trainer.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(noise_seed)
        feats, labels, _, pen = edit_features(
            trainer, ae, "classifier", zb, xb, args.alpha, 400, gen, spread, gain, bf16
        )
        loss = contrastive_loss(feats, labels) + 0.3 * pen
        loss.backward()
        loss = loss.detach()
        grads = torch.cat([p.grad.flatten() for p in trainer.parameters() if p.grad is not None])
        return float(loss), grads

    results = {}
    for bf16 in (False, True):
        step(bf16)  # warm-up (oneDNN kernel selection)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss, grads = step(bf16)
            times.append(time.perf_counter() - start)
        results[bf16] = (loss, grads)
        name = "bf16" if bf16 else "fp32"
        print(
            f"{name}: {sorted(times)[len(times) // 2] * 1000:.0f} ms per step (median of "
            f"{args.repeats}; K={args.k}, batch {args.batch}, {args.threads} threads), "
            f"loss {loss:.4f}"
        )
    (l32, g32), (l16, g16) = results[False], results[True]
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    rel = float((g16 - g32).norm() / g32.norm())
    print(
        f"bf16 against fp32: loss {l16 - l32:+.4f}, gradient cosine {cos:.4f}, "
        f"relative gradient error {rel:.3f}"
    )
    # The scale of that error: the same fp32 step with another draw of the noise at t_edit
    # (training draws new noise every step).
    l_other, g_other = step(False, noise_seed=2)
    cos = float(torch.nn.functional.cosine_similarity(g32, g_other, dim=0))
    rel = float((g_other - g32).norm() / g32.norm())
    print(
        f"fp32 with another noise draw against fp32: loss {l_other - l32:+.4f}, gradient cosine "
        f"{cos:.4f}, relative gradient difference {rel:.3f}"
    )


if __name__ == "__main__":
    main()
