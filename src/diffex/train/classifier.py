"""Classifier stage: train the built-in ResNet on a data set and write ``RUN/classifier/``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffex.data.loading import DataPlan, SplitData, plan_data, plan_summary
from diffex.errors import DiffexError
from diffex.evaluate.classification import classification_metrics, fit_temperature
from diffex.io.atomic import write_json
from diffex.io.checkpoint import load_config, load_state, save_module
from diffex.log import info
from diffex.models.classifier import ClassifierConfig, ResNetClassifier
from diffex.models.external import KINDS
from diffex.models.protocol import Classifier
from diffex.report.plots import confusion_and_reliability, training_curve
from diffex.rundir import RunDir
from diffex.runtime import to_channels_last
from diffex.train.distributed import rank, training_pool
from diffex.train.loop import EpochSampler, LoopConfig, run_loop
from diffex.train.resume import digest, stage_resume


@dataclass
class ClassifierTrainConfig:
    """Settings of the classifier stage."""

    image_size: int = 64
    preset: str = "small"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    patience: int = 5
    min_steps: int = 200
    temperature_scaling: bool = True
    augment: bool = True
    #: sd of a random log-gain applied to every channel of an image at once (0: off); teaches
    #: the classifier to ignore the overall stain gain, for data where it is a nuisance.
    gain_sd: float = 0.0
    #: stride of the network's first convolution (None: 2 from 64 px up, else 1); 2 trains a
    #: 48 px classifier about 3 times faster (BENCHMARKS: "Patched networks")
    stem_stride: int | None = None
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("image_size", "epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise DiffexError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.image_size < 16:
            raise DiffexError(f"image_size must be >= 16, got {self.image_size}")
        check_gain_sd(self.gain_sd)


def augment_batch(x: torch.Tensor, generator: torch.Generator, rotate: bool = True) -> torch.Tensor:
    """Random horizontal flips and (``rotate``) 90-degree rotations, per image: microscopy has
    no 'up'; data whose ``dataset.json`` says ``"orientation": "upright"`` gets flips only."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    k = torch.randint(0, 4, (n,), generator=generator)
    x = torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)
    if not rotate:
        return x
    out = x.clone()
    for r in range(1, 4):
        sel = (k == r).nonzero().flatten().to(x.device)
        if len(sel):
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def check_gain_sd(sd: float) -> None:
    """A gain augmentation's sd must lie in [0, 1] (0: off)."""
    if not 0.0 <= float(sd) <= 1.0:
        raise DiffexError(f"gain_sd must be between 0 and 1, got {sd}")


def gain_batch(x: torch.Tensor, generator: torch.Generator, sd: float) -> torch.Tensor:
    """Multiply each image's signal above the normalisation's low percentile (-1 in model space)
    by one random gain ``exp(N(0, sd))`` shared by its channels, clipped back to [-1, 1]."""
    g = torch.exp(sd * torch.randn(x.shape[0], generator=generator)).to(x.device, x.dtype)
    return ((x + 1.0) * g[:, None, None, None] - 1.0).clamp(-1.0, 1.0)


@torch.no_grad()
def predict(
    model: Classifier, x: torch.Tensor, device: torch.device, bs: int = 256
) -> torch.Tensor:
    """Logits for a tensor of images, in batches."""
    model.eval()
    out = [model.logits(x[i : i + bs].to(device)).float().cpu() for i in range(0, len(x), bs)]
    return torch.cat(out)


def train_classifier(
    data: str | Path, run: str | Path, cfg: ClassifierTrainConfig, device: torch.device
) -> dict[str, Any]:
    """Split the data, train, calibrate, evaluate, write RUN/classifier/; return metrics."""
    rd = RunDir(run).create()
    plan, splits = plan_data(data, cfg.image_size, seed=cfg.seed)
    for s in ("train", "val"):
        if len(splits[s].y) == 0:
            raise DiffexError(f"data {data} is too small: the {s} split is empty")
    counts = plan_summary(plan)
    info(f"classes {plan.classes}; images per split: {counts}")

    torch.manual_seed(cfg.seed)
    mcfg = ClassifierConfig.from_preset(
        cfg.preset, plan.channels, plan.image_size, plan.classes, stem_stride=cfg.stem_stride
    )
    model = ResNetClassifier(mcfg)
    model.set_input_stats(splits["train"].x)
    model.to(device)

    train = splits["train"]
    steps_per_epoch = max(1, len(train.y) // min(cfg.batch_size, len(train.y)))
    # Small data sets: at least min_steps steps, evaluated at least every 25 steps, so that a
    # few hundred images still give BatchNorm statistics and weights time to settle.
    every = max(steps_per_epoch, 25)
    loop = LoopConfig(
        steps=max(cfg.epochs * steps_per_epoch, cfg.min_steps),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=min(steps_per_epoch, 100),
        eval_every=every,
        patience=cfg.patience,
        log_every=every,
    )
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * rank())
    sampler = iter(EpochSampler(len(train.y), cfg.batch_size, cfg.seed))
    pool = training_pool(train.x, device)
    batches = ((pool[i], train.y[i]) for i in sampler)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int):
        x, y = batch
        if cfg.augment:
            x = augment_batch(x, aug_gen, rotate=plan.orientation == "any")
        if cfg.gain_sd > 0:
            x = gain_batch(x, aug_gen, cfg.gain_sd)
        logits = m(x.to(device, non_blocking=True))
        return {"loss": F.cross_entropy(logits, y.to(device))}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        logits = predict(m, splits["val"].x, device)
        y = splits["val"].y
        return {
            "val_loss": float(F.cross_entropy(logits, y)),
            "val_accuracy": float((logits.argmax(1) == y).float().mean()),
        }

    result = run_loop(
        model,
        loss_fn,
        batches,
        loop,
        device,
        evaluate=evaluate,
        score_key="val_loss",
        maximize=False,
        desc="classifier",
        resume=stage_resume(rd, "classifier", cfg, {"augment": aug_gen}, data=digest(asdict(plan))),
    )
    model = result.model

    loop_cfg = loop.to_dict()
    return finish_classifier(
        model,
        plan,
        splits,
        rd,
        device,
        {"kind": "resnet", "model": mcfg.to_dict(), "train": asdict(cfg), "loop": loop_cfg},
        temperature_scaling=cfg.temperature_scaling,
        extra={
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 1),
        },
        history=(result.history, result.evals),
        save=lambda out, config: save_module(out, model, config),
    )


def finish_classifier(
    model: Classifier,
    plan: DataPlan,
    splits: dict[str, SplitData],
    rd: RunDir,
    device: torch.device,
    config: dict[str, Any],
    temperature_scaling: bool,
    extra: dict[str, Any],
    save: Callable[[Path, dict[str, Any]], None],
    history: tuple[list[dict[str, float]], list[dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """What every classifier stage ends with, trained or brought by the user: fit the
    temperature on validation data, score val and test, save weights (``save``), the data plan,
    metrics.json and the plots into ``RUN/classifier/``."""
    temperature = 1.0
    if temperature_scaling:
        temperature = fit_temperature(predict(model, splits["val"].x, device), splits["val"].y)
    model.temperature.fill_(temperature)
    metrics: dict[str, Any] = {"temperature": temperature, **extra, "counts": plan_summary(plan)}
    for s in ("val", "test"):
        if len(splits[s].y):
            metrics[s] = _split_metrics(model, splits[s], plan, device, temperature)
    out = rd.stage("classifier")
    out.mkdir(parents=True, exist_ok=True)
    plan.save(rd.data_plan)  # written with the classifier, so a failed run leaves the old pair
    save(out, {**config, "temperature": temperature})
    if history is not None:
        metrics["history"] = {"evals": history[1]}
        training_curve(
            history[0],
            history[1],
            out / "training_curve.png",
            "classifier",
            eval_keys=("val_loss", "val_accuracy"),
        )
    write_json(out / "metrics.json", metrics)
    last = "test" if "test" in metrics else "val"
    confusion_and_reliability(
        metrics[last]["confusion_matrix"],
        metrics[last]["reliability"],
        plan.classes,
        out / "confusion_reliability.png",
        f"classifier ({last} split, T = {temperature:.2f})",
    )
    return metrics


def _split_metrics(
    model: Classifier,
    split: SplitData,
    plan: DataPlan,
    device: torch.device,
    temperature: float,
) -> dict[str, Any]:
    logits = predict(model, split.x, device)
    labels = split.y.numpy()
    calibrated = classification_metrics(
        F.softmax(logits / temperature, 1).numpy(), labels, plan.classes
    )
    raw = classification_metrics(F.softmax(logits, 1).numpy(), labels, plan.classes)
    calibrated["ece_before_temperature"] = raw["ece"]
    calibrated["nll_before_temperature"] = raw["nll"]
    calibrated["mean_max_probability"] = float(
        np.max(F.softmax(logits / temperature, 1).numpy(), 1).mean()
    )
    return calibrated


def load_classifier(run: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Load the classifier of a run (trained here or brought by the user), frozen, eval mode."""
    rd = RunDir(run)
    folder = rd.require("classifier")
    cfg = load_config(folder)
    if cfg.get("kind") in KINDS:
        from diffex.train.attach import load_external

        model: torch.nn.Module = load_external(rd, cfg)
    elif cfg.get("kind") == "resnet" and "model" in cfg:
        model = ResNetClassifier(
            ClassifierConfig.from_dict(cfg["model"], f"{folder}/config.json model")
        )
        load_state(model, folder / "model.safetensors")
        to_channels_last(model, device)
    else:
        raise DiffexError(f"{folder / 'config.json'} does not describe a classifier DiffEx knows")
    return model.to(device).eval().requires_grad_(False)
