"""Speed of the expensive parts, optimised path against a plain fp32 eager baseline of the same
model in the same run: autoencoder training (the product's own ``run_loop``: clipping and EMA
included), DDIM decoding, and an AttFind-sized ranking workload (inversion included).

- models: ``paper128`` (the authors' 128 px DiffAE: base 128, multipliers 1,1,2,3,4, attention at
  16) and ``cpu64`` (DiffEx's 64 px model), each with a small ResNet classifier beside it.
- optimised: on CUDA bf16 autocast, channels_last, ``torch.compile`` of the networks, fused
  AdamW; on a CPU the same switches where they exist (compile only with ``--compile``).
- baseline: fp32, eager, NCHW (AdamW is fused on CUDA in both: it is the optimiser, not a switch).
- FLOPs per training image are counted with ``torch.utils.flop_counter`` (forward and backward of
  one real training step); MFU = FLOPs per image x images per second / the card's dense bf16 peak.

Run on a GPU: ``python benchmarks/bench_gpu.py --out bench_gpu.json --markdown BENCHMARKS.md``.
On a CPU it runs smaller (``--small``: fewer steps, batch 2, a 4 x 2 x 2 x 5 ranking) so it
finishes in minutes; its numbers say how the paths compare here, not what a GPU does.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffex.models.autoencoder import AutoencoderConfig, DiffusionAutoencoder
from diffex.models.classifier import ClassifierConfig, ResNetClassifier
from diffex.train.loop import LoopConfig, compile_submodules, run_loop

#: Dense bf16 peak FLOP/s by card name (vendor datasheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
MARK_BEGIN, MARK_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def build(model: str, device: torch.device, channels: int = 3) -> DiffusionAutoencoder:
    """The autoencoder of a preset with a small ResNet classifier (random weights) beside it."""
    size = {"paper128": 128, "cpu64": 64}[model]
    torch.manual_seed(0)
    ccfg = ClassifierConfig.from_preset("small", channels, size, ["control", "treated"])
    clf = ResNetClassifier(ccfg).eval().requires_grad_(False)
    cfg = AutoencoderConfig.from_preset(model, channels, size)
    return DiffusionAutoencoder(cfg, clf).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> float:
    """Peak memory in GiB: allocated on the GPU, resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def training_flops(ae: DiffusionAutoencoder, batch: int, device: torch.device) -> float:
    """FLOPs of one training step's forward and backward, per image."""
    x = torch.randn(batch, ae.config.unet.in_channels, *(2 * [ae.config.unet.image_size]))
    gen = torch.Generator().manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = ae.training_loss(x.to(device), generator=gen, consistency_weight=1.0)["loss"]
        loss.backward()
    ae.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def train_speed(
    model: str,
    device: torch.device,
    optimised: bool,
    batch: int,
    steps: int,
    warmup: int,
    compile_cpu: bool,
) -> dict[str, Any]:
    """Images per second of the product's training loop (clipping, EMA, consistency loss)."""
    ae = build(model, device)
    cuda = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = LoopConfig(
        steps=warmup + steps,
        lr=1e-4,
        ema_decay=0.9999,
        grad_clip=1.0,
        log_every=10**9,
        precision="bf16" if optimised and cuda else "fp32",
        compile=optimised and (cuda or compile_cpu),
        channels_last=optimised,
    )
    gen = torch.Generator().manual_seed(0)
    size = ae.config.unet.image_size
    x = torch.randn(batch, ae.config.unet.in_channels, size, size, device=device)
    stamps: list[float] = []

    def batches() -> Iterator[torch.Tensor]:
        while True:
            _sync(device)
            stamps.append(time.perf_counter())
            yield x

    def loss_fn(m: torch.nn.Module, xb: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return m.training_loss(xb, generator=gen, consistency_weight=1.0)

    run_loop(ae, loss_fn, batches(), cfg, device, desc=f"train {model}")
    _sync(device)
    stamps.append(time.perf_counter())
    n_steps = len(stamps) - 1 - warmup  # stamps: the start of every step, then the end
    seconds = stamps[-1] - stamps[warmup]
    return {
        "images_per_s": batch * n_steps / seconds,
        "step_ms": 1000 * seconds / n_steps,
        "peak_memory_gib": _peak_memory(device),
        "precision": cfg.precision,
        "compile": bool(cfg.compile),
        "channels_last": bool(cfg.channels_last),
    }


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, compilation)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def inference_model(
    model: str, device: torch.device, optimised: bool, compile_cpu: bool
) -> DiffusionAutoencoder:
    """An autoencoder for decoding: plain, or channels_last and compiled (on a CPU only with
    ``--compile``)."""
    ae = build(model, device).eval()
    if optimised:
        ae.unet.to(memory_format=torch.channels_last)
        if device.type == "cuda" or compile_cpu:
            compile_submodules(ae)
    return ae


def decode_speed(
    model: str,
    device: torch.device,
    optimised: bool,
    batch: int,
    steps: int,
    repeats: int,
    compile_cpu: bool,
) -> dict[str, Any]:
    """Image-steps per second of deterministic DDIM decoding."""
    ae = inference_model(model, device, optimised, compile_cpu)
    z = torch.randn(batch, int(ae.config.z_dim or 0), device=device)
    size = ae.config.unet.image_size
    x_T = torch.randn(batch, ae.config.unet.in_channels, size, size, device=device)
    seconds = _timed(lambda: ae.decode(z, x_T, steps=steps, batch_size=batch), device, repeats)
    return {"image_steps_per_s": batch * steps / seconds, "batch": batch, "steps": steps}


def ranking_time(
    model: str,
    device: torch.device,
    optimised: bool,
    n_images: int,
    k: int,
    steps: int,
    batch: int,
    compile_cpu: bool,
) -> dict[str, Any]:
    """Seconds for AttFind's decoding work: invert N images, decode N x K x 2 edits, score."""
    ae = inference_model(model, device, optimised, compile_cpu)
    size = ae.config.unet.image_size
    x = torch.rand(n_images, ae.config.unet.in_channels, size, size, device=device) * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(k, int(ae.config.z_dim or 0)), dim=1)

    def work() -> None:
        z, x_T = ae.encode(x, steps=steps, batch_size=batch)
        moved = torch.cat([z + s * d.to(z.device) for d in dirs for s in (-1.0, 1.0)])
        edited = ae.decode(moved, x_T.repeat(2 * k, 1, 1, 1), steps=steps, batch_size=batch)
        with torch.no_grad():
            for i in range(0, len(edited), batch):
                ae.classifier.probs(edited[i : i + batch])

    _sync(device)
    ae.decode(torch.zeros(1, int(ae.config.z_dim or 0), device=device), None, steps=1)  # warm
    start = time.perf_counter()
    work()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": n_images, "directions": k, "steps": steps}


def card(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (None when unknown or a CPU)."""
    if device.type != "cuda":
        cpu = platform.processor() or platform.machine()
        return f"CPU: {cpu}, {torch.get_num_threads()} threads", None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return name, peak


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md block."""
    lines = [
        MARK_BEGIN,
        f"Measured by `benchmarks/bench_gpu.py` on **{result['device']}**, torch "
        f"{result['torch']}, {result['date']} (settings: {result['settings']}).",
        "",
        "| model | measure | optimised | fp32 eager | ratio |",
        "|---|---|---|---|---|",
    ]
    for model, r in result["models"].items():
        o, b = r["train"]["optimised"], r["train"]["baseline"]
        lines.append(
            f"| {model} | training images/s (clip + EMA) | {o['images_per_s']:.1f} | "
            f"{b['images_per_s']:.1f} | {o['images_per_s'] / b['images_per_s']:.2f}x |"
        )
        lines.append(
            f"| {model} | peak memory (GiB) | {o['peak_memory_gib']:.1f} | "
            f"{b['peak_memory_gib']:.1f} | |"
        )
        mfu = r.get("mfu")
        lines.append(
            f"| {model} | training GFLOP per image / MFU | {r['gflop_per_image']:.0f} / "
            f"{'n/a' if mfu is None else f'{100 * mfu:.0f} %'} | | |"
        )
        o, b = r["decode"]["optimised"], r["decode"]["baseline"]
        lines.append(
            f"| {model} | DDIM image-steps/s (batch {o['batch']}) | "
            f"{o['image_steps_per_s']:.0f} | {b['image_steps_per_s']:.0f} | "
            f"{o['image_steps_per_s'] / b['image_steps_per_s']:.2f}x |"
        )
        o, b = r["rank"]["optimised"], r["rank"]["baseline"]
        lines.append(
            f"| {model} | ranking {o['images']} x {o['directions']} x 2 x {o['steps']} (s) | "
            f"{o['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / o['seconds']:.2f}x |"
        )
    lines.append(MARK_END)
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    """Replace the marked block of BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.is_file() else ""
    if MARK_BEGIN in text and MARK_END in text:
        text = re.sub(
            re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END),
            lambda _m: block,
            text,
            flags=re.S,
        )
    else:
        text = text.rstrip() + "\n\n## Speed (bench_gpu.py)\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", default="paper128,cpu64")
    parser.add_argument("--small", action="store_true", help="CPU-sized runs (default on a CPU)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile on a CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="update BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # the baseline stays true fp32
    small = args.small or device.type == "cpu"
    s = {
        "train_batch": 2 if small else 64,
        "train_steps": 2 if small else 20,
        "warmup": 1 if small else 5,
        "decode_batch": 2 if small else 64,
        "ddim_steps": 5 if small else 20,
        "rank": (4, 2, 5, 16) if small else (256, 10, 20, 256),
    }
    small_rank = {"paper128": (2, 1, 3, 8)}  # the 128 px model on a CPU: a taste only
    name, peak = card(device)
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": ", ".join(f"{k} {v}" for k, v in s.items()),
        "models": {},
    }
    for model in [m for m in args.models.split(",") if m]:
        r: dict[str, Any] = {}
        ae = build(model, device)
        r["gflop_per_image"] = training_flops(ae, 2, device) / 1e9
        del ae
        r["train"], r["decode"], r["rank"] = {}, {}, {}
        for label, opt in (("baseline", False), ("optimised", True)):
            r["train"][label] = train_speed(
                model, device, opt, s["train_batch"], s["train_steps"], s["warmup"], args.compile
            )
            r["decode"][label] = decode_speed(
                model,
                device,
                opt,
                s["decode_batch"],
                s["ddim_steps"],
                2 if small else 5,
                args.compile,
            )
            n, k, steps, batch = small_rank.get(model, s["rank"]) if small else s["rank"]
            r["rank"][label] = ranking_time(model, device, opt, n, k, steps, batch, args.compile)
            print(model, label, json.dumps({k: r[k][label] for k in ("train", "decode", "rank")}))
        ips = r["train"]["optimised"]["images_per_s"]
        r["mfu"] = None if peak is None else r["gflop_per_image"] * 1e9 * ips / peak
        result["models"][model] = r
    block = markdown(result)
    print(block)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        write_markdown(args.markdown, block)


if __name__ == "__main__":
    main()
