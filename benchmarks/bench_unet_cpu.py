"""Micro-benchmark: parameters and forward+backward time of the ``cpu64`` UNet (and the full
autoencoder step) on this CPU at batch 32; with ``--classifier``, also one training step of the
demo's classifier (``small`` preset, batch 64, 48 px, fp32).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_unet_cpu.py [--preset cpu64] [--batch 32]
[--no-channels-last] [--bf16] [--compile] [--classifier] [--stem-stride 2] [--size PX]
[--attn RES,...]``

``--preset cpu64p`` times the patched networks of ``demo --preset fast`` (2 x 2 pixel patches);
``--stem-stride 2`` its classifier (stride 2 in its first convolution).

``--size`` builds the networks (and the classifier) for another image size; ``--attn`` sets the
UNet's attention resolutions (``--attn=`` for none besides the middle block).

``--bf16`` runs the steps under bf16 autocast (as the autoencoder trains on a CPU with native
bf16); ``--compile`` wraps the networks in ``torch.compile`` (its compile time is reported
apart: the warm-up calls).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from diffex.models.classifier import ClassifierConfig, ResNetClassifier
from diffex.models.encoder import SemanticEncoder, encoder_preset
from diffex.models.unet import UNET_PRESETS, UNet, count_parameters, unet_preset


def time_step(
    unet: UNet,
    encoder: SemanticEncoder,
    batch: int,
    repeats: int,
    channels_last: bool,
    bf16: bool = False,
    compiled: bool = False,
) -> tuple[float, float]:
    """Median ms of (UNet fwd+bwd, encoder+UNet fwd+bwd) on random data."""
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        unet.to(memory_format=torch.channels_last)
        encoder.to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,))
    z = torch.randn(batch, cfg.z_dim)
    proj = torch.nn.Linear(encoder.config.out_dim, cfg.z_dim)
    net: Callable = torch.compile(unet) if compiled else unet
    enc: Callable = torch.compile(encoder) if compiled else encoder

    def cast() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def unet_only() -> None:
        with cast():
            loss = net(x, t, z).float().square().mean()
        loss.backward()

    def full() -> None:
        with cast():
            loss = net(x, t, proj(enc(x))).float().square().mean()
        loss.backward()

    return median_ms(unet_only, repeats), median_ms(full, repeats)


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median ms of ``fn`` over ``repeats`` calls after two warm-up calls (allocations, oneDNN
    kernel selection, compilation), whose time is printed."""
    start = time.perf_counter()
    fn()
    fn()
    print(f"  warm-up (2 calls): {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def time_classifier(
    repeats: int,
    channels_last: bool,
    batch: int = 64,
    size: int = 48,
    stem_stride: int | None = None,
) -> float:
    """Median ms of one AdamW training step (fp32, as the classifier stage trains) of the demo's
    classifier on random data."""
    cfg = ClassifierConfig.from_preset("small", 3, size, ["a", "b"], stem_stride=stem_stride)
    clf = ResNetClassifier(cfg).train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        clf.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(clf.parameters())

    def step() -> None:
        opt.zero_grad()
        clf.logits(x).square().mean().backward()
        opt.step()

    return median_ms(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu64", choices=list(UNET_PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW layout")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--classifier", action="store_true", help="also time the classifier")
    parser.add_argument(
        "--stem-stride",
        type=int,
        choices=(1, 2),
        help="the classifier's first stride [default: its size rule, 1 at 48 px]",
    )
    parser.add_argument("--size", type=int, help="image size [default: the preset's]")
    parser.add_argument(
        "--attn",
        type=lambda text: tuple(int(r) for r in text.split(",") if r.strip()),
        help="comma-separated attention resolutions of the UNet, '' for none "
        "[default: the preset's]",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size: dict = {"image_size": args.size} if args.size else {}
    attn: dict = {} if args.attn is None else {"attn_resolutions": args.attn}
    unet_cfg = unet_preset(args.preset, **size, **attn)
    unet = UNet(unet_cfg).train()
    encoder = SemanticEncoder(encoder_preset(args.preset, **size)).train()
    levels = [
        (unet_cfg.image_size // unet_cfg.patch_size) >> i for i in range(len(unet_cfg.channel_mult))
    ]
    attends = [r for r in levels if r in unet_cfg.attn_resolutions] or "none"
    print(
        f"preset {args.preset} at {unet_cfg.image_size} px (feature maps {levels}; attention "
        f"at {attends} and in the middle block): UNet {count_parameters(unet):,} params, "
        f"encoder {count_parameters(encoder):,} params"
    )
    channels_last = not args.no_channels_last
    unet_ms, full_ms = time_step(
        unet, encoder, args.batch, args.repeats, channels_last, args.bf16, args.compile
    )
    memory = "channels_last" if channels_last else "NCHW"
    layout = memory + (", bf16" if args.bf16 else ", fp32") + (", compiled" if args.compile else "")
    print(
        f"batch {args.batch}, {args.threads} threads, {layout}: UNet fwd+bwd {unet_ms:.0f} ms, "
        f"encoder+UNet fwd+bwd {full_ms:.0f} ms"
    )
    if args.classifier:
        size = args.size or 48
        ms = time_classifier(args.repeats, channels_last, size=size, stem_stride=args.stem_stride)
        stride = "" if args.stem_stride is None else f", stem stride {args.stem_stride}"
        print(
            f"classifier (small, batch 64, {size} px{stride}) fp32 training step, {memory}: "
            f"{ms:.0f} ms"
        )


if __name__ == "__main__":
    main()
