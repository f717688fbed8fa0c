"""Autoencoder stage: train the classifier-aware diffusion autoencoder into ``RUN/autoencoder/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffex.config import INVERSION_REFINE
from diffex.data.loading import DataPlan, load_split
from diffex.errors import DiffexError
from diffex.evaluate.fidelity import classifier_agreement, pixel_metrics
from diffex.io.atomic import write_json
from diffex.io.checkpoint import load_config, load_state, save_module
from diffex.log import info
from diffex.models.autoencoder import AutoencoderConfig, DiffusionAutoencoder
from diffex.models.nuisance import natural_spread
from diffex.models.protocol import Classifier
from diffex.report.grids import reconstruction_grid
from diffex.report.plots import training_curve
from diffex.rundir import RunDir
from diffex.runtime import (
    check_inversion_refine,
    check_precision,
    resolve_precision,
    to_channels_last,
)
from diffex.train.classifier import augment_batch, check_gain_sd, gain_batch, load_classifier
from diffex.train.distributed import rank, training_pool
from diffex.train.loop import EpochSampler, LoopConfig, run_loop
from diffex.train.resume import stage_resume, weights_digest


@dataclass
class AutoencoderTrainConfig:
    """Settings of the autoencoder stage (model preset, optimisation, semantic-pathway levers)."""

    preset: str = "cpu64"
    classifier_output: str = "probs"
    prediction: str = "v"
    z_dim: int | None = None
    z_norm: bool = False
    #: feature-map sizes (px) with self-attention in the UNet; None keeps the preset's
    attention: list[int] | None = None
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    t_skew: float = 1.0
    consistency_weight: float = 0.1
    consistency_start: int = 500
    consistency_ramp: int = 500
    consistency_tmax: int = 200
    consistency_fraction: float = 1.0
    #: weight of the class-axis invariance term (0: off): the decoder is penalised for changing
    #: the imaging statistics (background, position, nucleus gain) when z_sem moves outward
    #: along the batch's class axis, away from the other class, by up to ``axis_reach`` class
    #: gaps (past the data); on the consistency term's schedule and share of the batch. See
    #: :meth:`diffex.models.autoencoder.DiffusionAutoencoder.class_axis_penalty`.
    axis_invariance: float = 0.0
    axis_reach: float = 3.0
    augment: bool = True
    #: sd of a random log-gain per training image, shared by its channels (0: off); see
    #: :func:`diffex.train.classifier.gain_batch`
    gain_sd: float = 0.0
    sample_every: int = 500
    eval_images: int = 128
    ddim_steps: int = 50
    precision: str = "auto"
    accumulate: int = 1
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "eval_images", "ddim_steps"):
            if int(getattr(self, key)) < 1:
                raise DiffexError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.attention is not None:
            self.attention = [int(r) for r in self.attention]
            if any(r < 1 for r in self.attention):
                raise DiffexError(f"attention sizes must be >= 1 px, got {self.attention}")
        check_gain_sd(self.gain_sd)
        if self.t_skew < 0:
            raise DiffexError(f"t_skew must be >= 0, got {self.t_skew}")
        if self.consistency_weight < 0:
            raise DiffexError(f"consistency_weight must be >= 0, got {self.consistency_weight}")
        if not 0 < self.consistency_fraction <= 1:
            raise DiffexError(
                f"consistency_fraction must be in (0, 1], got {self.consistency_fraction}"
            )
        if self.axis_invariance < 0:
            raise DiffexError(f"axis_invariance must be >= 0, got {self.axis_invariance}")
        if self.axis_reach <= 0:
            raise DiffexError(f"axis_reach must be > 0, got {self.axis_reach}")
        check_precision(self.precision)

    def ramp_at(self, step: int) -> float:
        """0 before ``consistency_start``, then a linear ramp to 1 over ``consistency_ramp``."""
        if step < self.consistency_start:
            return 0.0
        return min(1.0, (step - self.consistency_start + 1) / max(1, self.consistency_ramp))

    def consistency_at(self, step: int) -> float:
        """Consistency weight at ``step``: 0 before ``consistency_start``, then a linear ramp."""
        return self.consistency_weight * self.ramp_at(step)

    def axis_invariance_at(self, step: int) -> float:
        """Class-axis invariance weight at ``step``, on the consistency term's ramp."""
        return self.axis_invariance * self.ramp_at(step)


def heldout_subset(plan: DataPlan, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` test images (validation when there is no test split), balanced over classes."""
    split = "test" if plan.splits.get("test") else "val"
    data = load_split(plan, split)
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    per = max(1, n // len(plan.classes))
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(len(plan.classes))]
    )
    idx = np.sort(idx)
    return data.x[idx], data.y[idx]


def train_autoencoder(
    run: str | Path, cfg: AutoencoderTrainConfig, device: torch.device
) -> dict[str, Any]:
    """Train on the run's training split; evaluate on held-out images; write RUN/autoencoder/."""
    rd = RunDir(run)
    plan = rd.load_plan()
    classifier = load_classifier(run, device)
    train = load_split(plan, "train")
    out = rd.stage("autoencoder")
    torch.manual_seed(cfg.seed)
    model_cfg = AutoencoderConfig.from_preset(
        cfg.preset,
        plan.channels,
        plan.image_size,
        classifier_output=cfg.classifier_output,
        unet_overrides={
            "z_norm": cfg.z_norm,
            **({} if cfg.attention is None else {"attn_resolutions": tuple(cfg.attention)}),
        },
        prediction=cfg.prediction,
        **({"z_dim": cfg.z_dim} if cfg.z_dim else {}),
    )
    model = DiffusionAutoencoder(model_cfg, classifier).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    info(f"autoencoder: {n_params / 1e6:.2f} M parameters, {len(train.y)} training images")

    precision = resolve_precision(cfg.precision, device)
    info(f"autoencoder: {precision} training ({cfg.precision})")
    # Previews and the final round trips decode as rank, explain and evaluate do: the UNet under
    # bf16 autocast where it trained in bf16 (BENCHMARKS: "bf16 round trips in the autoencoder
    # stage").
    decode_bf16 = precision == "bf16"
    loop = LoopConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        schedule="constant",
        ema_decay=cfg.ema_decay,
        eval_every=cfg.sample_every,
        log_every=max(1, cfg.steps // 50),
        precision=precision,
        accumulate=cfg.accumulate,
    )
    gen = torch.Generator().manual_seed(cfg.seed + 11 + 1_000_003 * rank())  # noise per rank
    sampler = iter(EpochSampler(len(train.y), cfg.batch_size, cfg.seed))
    pool = training_pool(train.x, device)
    batches = ((pool[i], train.y[i]) for i in sampler)
    gain_channel = plan.measure_channels.get("nucleus")
    spread = None
    if cfg.axis_invariance > 0:
        spread = natural_spread(train.x, gain_channel).to(device)
        info(f"autoencoder: class-axis invariance {cfg.axis_invariance} to {cfg.axis_reach} gaps")

    def loss_fn(
        m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        if cfg.augment:
            x = augment_batch(x, gen, rotate=plan.orientation == "any")
        if cfg.gain_sd > 0:
            x = gain_batch(x, gen, cfg.gain_sd)
        x = x.to(device, non_blocking=True)
        out = m.training_loss(
            x,
            generator=gen,
            t_skew=cfg.t_skew,
            consistency_weight=cfg.consistency_at(step),
            consistency_tmax=cfg.consistency_tmax,
            consistency_fraction=cfg.consistency_fraction,
        )
        weight = cfg.axis_invariance_at(step)
        if spread is not None and weight > 0:
            penalty = m.class_axis_penalty(
                x, y, spread, gen, gain_channel, cfg.axis_reach, cfg.consistency_fraction
            )
            out["axis_invariance"] = penalty
            out["loss"] = out["loss"] + weight * penalty
        return out

    held_x, held_y = heldout_subset(plan, cfg.eval_images, cfg.seed)
    pidx = _preview_index(held_y, len(plan.classes), per_class=4)
    preview, plabels = held_x[pidx], [plan.classes[int(held_y[i])] for i in pidx]

    def sample_grid(step: int, m: torch.nn.Module) -> None:
        m.decode_bf16 = decode_bf16
        recon, zonly = _roundtrips(m, preview, steps=20, seed=cfg.seed)
        reconstruction_grid(
            preview,
            recon,
            zonly,
            plan,
            out / "samples" / f"step_{step:06d}.png",
            title=f"step {step} (20 DDIM steps)",
            labels=plabels,
        )

    result = run_loop(
        model,
        loss_fn,
        batches,
        loop,
        device,
        callbacks=[sample_grid],
        desc="autoencoder",
        resume=stage_resume(  # the resolved precision: never resume bf16 steps in fp32
            rd,
            "autoencoder",
            replace(cfg, precision=precision),
            {"noise": gen},
            classifier=weights_digest(rd, "classifier"),
        ),
    )
    ema = result.model
    config = {
        "model": model_cfg.to_dict(),
        "train": asdict(cfg),
        "loop": loop.to_dict(),
        "classifier": str(rd.stage("classifier")),
    }
    save_module(out, ema, config)

    ema.decode_bf16 = decode_bf16
    info(
        f"autoencoder: evaluating on {len(held_y)} held-out images ({cfg.ddim_steps} DDIM steps, "
        f"{ema.decode_precision} decodes)"
    )
    metrics = evaluate_autoencoder(
        ema, classifier, held_x, held_y, plan, cfg.ddim_steps, cfg.seed, out / "reconstructions.png"
    )
    metrics["train_seconds"] = round(result.seconds, 1)
    metrics["steps"] = cfg.steps
    metrics["images_seen"] = cfg.steps * min(cfg.batch_size, len(train.y))
    metrics["history"] = result.history[:: max(1, len(result.history) // 500)]
    write_json(out / "metrics.json", metrics)
    training_curve(result.history, [], out / "training_curve.png", "autoencoder")
    return metrics


def _preview_index(y: torch.Tensor, n_classes: int, per_class: int) -> list[int]:
    """The first ``per_class`` images of every class."""
    return [int(i) for c in range(n_classes) for i in np.flatnonzero(y.numpy() == c)[:per_class]]


def _roundtrips(
    model: DiffusionAutoencoder, x: torch.Tensor, steps: int, seed: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact reconstructions decode(encode(x)) and semantic-only ones decode(z, noise)."""
    z, x_T = model.encode(x, steps, batch_size)
    recon = model.decode(z, x_T, steps, batch_size)
    gen = torch.Generator(device=model.device).manual_seed(seed + 12345)
    zonly = model.decode(z, None, steps, batch_size, generator=gen)
    return recon.cpu(), zonly.cpu()


def evaluate_autoencoder(
    model: DiffusionAutoencoder,
    classifier: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: DataPlan,
    steps: int,
    seed: int,
    grid_path: Path | None = None,
) -> dict[str, Any]:
    """Round-trip and semantic-only fidelity on held-out images, overall and per condition."""
    recon, zonly = _roundtrips(model, x, steps, seed)
    metrics: dict[str, Any] = {
        "n_images": len(y),
        "ddim_steps": steps,
        "precision": model.decode_precision,
        "inversion": model.inversion,
    }
    for name, copy in (("roundtrip", recon), ("semantic_only", zonly)):
        m = pixel_metrics(x, copy)
        m.update(classifier_agreement(classifier, x, copy))
        m["per_class_agreement"] = {
            c: classifier_agreement(classifier, x[y == i], copy[y == i])["agreement"]
            for i, c in enumerate(plan.classes)
            if (y == i).any()
        }
        metrics[name] = m
    if grid_path is not None:
        idx = _preview_index(y, len(plan.classes), per_class=6)
        reconstruction_grid(
            x[idx],
            recon[idx],
            zonly[idx],
            plan,
            grid_path,
            title=f"held-out cells: originals, exact and semantic-only reconstructions "
            f"({steps} DDIM steps)",
            labels=[plan.classes[int(y[i])] for i in idx],
        )
    return metrics


def load_autoencoder(
    run: str | Path,
    device: torch.device | str = "cpu",
    classifier: Classifier | None = None,
    precision: str = "fp32",
    gain_margin: float | None = None,
    inversion_refine: int = INVERSION_REFINE,
) -> DiffusionAutoencoder:
    """Load a run's trained autoencoder (EMA weights) with its classifier, in eval mode.

    ``precision`` (auto, fp32 or bf16) of its DDIM inversion and decoding: bf16 runs the UNet
    under autocast (``auto``: where the hardware has native bf16); the DDIM state, the encoder
    and the classifier stay fp32. ``gain_margin``: bound the UNet's z gains to their range over
    the run's training images (:meth:`diffex.models.unet.UNet.limit_z_gains`); None leaves them
    free. ``inversion_refine``: fixed-point refinement of its DDIM inversion (0: plain)."""
    check_inversion_refine(inversion_refine)
    rd = RunDir(run)
    folder = rd.require("autoencoder")
    cfg = load_config(folder)
    if "model" not in cfg:
        raise DiffexError(f"{folder / 'config.json'} does not describe a DiffEx autoencoder")
    classifier = classifier if classifier is not None else load_classifier(run, device)
    mcfg = AutoencoderConfig.from_dict(cfg["model"], f"{folder}/config.json model")
    model = DiffusionAutoencoder(mcfg, classifier)
    load_state(model, folder / "model.safetensors")
    model.to(device).eval()
    model.decode_bf16 = resolve_precision(precision, device) == "bf16"
    model.inversion_refine = inversion_refine
    to_channels_last(model.encoder, device)
    to_channels_last(model.unet, device)
    if gain_margin is not None:
        bound_gains(
            model, semantic_latents(model, load_split(rd.load_plan(), "train").x), gain_margin
        )
    return model


def semantic_latents(
    ae: DiffusionAutoencoder, x: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """z_sem of every image (no DDIM inversion needed), on the CPU."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(ae.semantic(x[i : i + batch_size].to(ae.device)).float().cpu())
    return torch.cat(out)


def bound_gains(model: DiffusionAutoencoder, z_train: torch.Tensor, margin: float) -> None:
    """Bound ``model``'s z gains to their range over ``z_train``, the semantic latents of the
    run's training images (:func:`semantic_latents`), widened by ``margin`` of it on each side."""
    model.unet.limit_z_gains(z_train, margin)
    info(
        f"autoencoder: z gains bounded to their range over {len(z_train)} training images "
        f"(margin {margin:g})"
    )
