"""Micro-benchmark: DDIM inversion and decoding (what rank, explain and evaluate spend their time
on) of a trained run, with the UNet in fp32 and under bf16 autocast, and how far bf16 moves the
round trips and the classifier's response to an edit.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_decode_cpu.py RUN [--images 32]
[--steps 10 20] [--alpha 2] [--threads 2]`` (RUN: a run folder with a trained autoencoder).

The edit is the class-mean reference (source class mean to target class mean in standardised
z, ``--alpha`` class gaps) decoded from each image's own x_T, as the rank stage decodes edits.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffex.data.loading import load_split
from diffex.models.directions import LatentSpace
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder
from diffex.train.directions import semantic_latents


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rd = RunDir(args.run)
    plan = rd.load_plan()
    ae = load_autoencoder(args.run, "cpu")
    train = load_split(plan, "train")
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))[:512]
    space = LatentSpace(ae.config.z_dim or 0, len(plan.classes))
    space.fit(semantic_latents(ae, train.x[pick]), train.y[pick])
    test = load_split(plan, "test")
    source, target = 0, len(plan.classes) - 1
    x = test.x[test.y == source][: args.images]
    direction = space.class_direction(source, target)
    print(
        f"{len(x)} {plan.classes[source]} test images, edit {args.alpha} class gaps towards "
        f"{plan.classes[target]}, {args.threads} threads"
    )
    for steps in args.steps:
        out: dict[bool, dict[str, torch.Tensor]] = {}
        for bf16 in (False, True):
            ae.decode_bf16 = bf16
            ae.reconstruct(x[:4], steps=2)  # warm-up (oneDNN kernel selection)
            start = time.perf_counter()
            z, x_T = ae.encode(x, steps)
            t_enc = time.perf_counter() - start
            start = time.perf_counter()
            rec = ae.decode(z, x_T, steps)
            t_dec = time.perf_counter() - start
            edit = ae.decode(space.shift(z, direction, args.alpha), x_T, steps)
            with torch.inference_mode():
                p_rec = ae.classifier.probs(rec)[:, target]
                p_edit = ae.classifier.probs(edit)[:, target]
            out[bf16] = {"rec": rec, "edit": edit, "p_rec": p_rec, "p_edit": p_edit}
            name = "bf16" if bf16 else "fp32"
            dp = p_edit - p_rec
            print(
                f"{steps} steps {name}: encode {t_enc:.1f} s, decode {t_dec:.1f} s; round trip "
                f"PSNR {psnr(rec, x):.2f} dB; edit mean delta-p {float(dp.mean()):.3f}, "
                f"flip rate {float((p_edit > 0.5).float().mean()):.2f}"
            )
        a, b = out[False], out[True]
        print(
            f"{steps} steps bf16 against fp32: round trips {psnr(a['rec'], b['rec']):.1f} dB "
            f"apart, edits {psnr(a['edit'], b['edit']):.1f} dB apart, |p(target)| differences "
            f"mean {float((a['p_edit'] - b['p_edit']).abs().mean()):.4f} "
            f"max {float((a['p_edit'] - b['p_edit']).abs().max()):.4f}"
        )


if __name__ == "__main__":
    main()
