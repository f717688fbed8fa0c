"""Classifier stage for a user's own network (``diffex use-classifier``): no training, just
checking it against the data, calibrating it and writing ``RUN/classifier/`` like the built-in
stage does."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffex.data.loading import DataPlan, plan_data
from diffex.errors import DiffexError
from diffex.io.atomic import write_atomic, write_json
from diffex.io.checkpoint import save_weights
from diffex.log import info
from diffex.models.external import (
    ExternalClassifier,
    ExternalSpec,
    load_network,
    validate_classifier,
)
from diffex.rundir import WEIGHT_FILES, RunDir
from diffex.train.classifier import finish_classifier

#: Where each kind keeps its weights inside ``RUN/classifier/``.
WEIGHTS = {"torchscript": "model.pt", "entry": "model.safetensors"}


@dataclass
class AttachConfig:
    """Settings of ``use-classifier``: the run's image size (default: the classifier's declared
    input size, else 64), temperature fitting, the split seed and the validation batch."""

    image_size: int | None = None
    temperature_scaling: bool = True
    validate_images: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 16:
            raise DiffexError(f"--image-size must be >= 16, got {self.image_size}")
        if self.validate_images < 1:
            raise DiffexError(f"validate_images must be >= 1, got {self.validate_images}")


def wrap(net: torch.nn.Module, spec: ExternalSpec, plan: DataPlan) -> ExternalClassifier:
    """The user's network behind DiffEx's classifier protocol, for this run's data."""
    norm = plan.normalization
    return ExternalClassifier(
        net,
        spec,
        plan.classes,
        plan.image_size,
        plan.channels,
        norm.low,
        norm.high,
        per_image=norm.mode == "image",
    )


def attach_classifier(
    data: str | Path, run: str | Path, spec: ExternalSpec, cfg: AttachConfig, device: torch.device
) -> dict[str, Any]:
    """Split the data, load and validate the user's classifier on it, fit a temperature, score
    it on val and test, and write RUN/data.json and RUN/classifier/; returns the metrics."""
    rd = RunDir(run).create()
    net = load_network(spec)
    image_size = cfg.image_size or spec.input_size or 64
    plan, splits = plan_data(data, image_size, seed=cfg.seed)
    if len(splits["val"].y) == 0:
        raise DiffexError(f"data {data} is too small: the val split is empty")
    model = wrap(net, spec, plan).eval().requires_grad_(False)
    batch = splits["val"].x[: cfg.validate_images]
    validate_classifier(model, batch)
    model.to(device)
    info(
        f"classifier {spec.source}: {len(plan.classes)} classes, input "
        f"{model.net_channels}x{model.input_size}x{model.input_size}, "
        f"{model.feature_dim} features ({spec.features or 'logits'})"
    )

    def save(out: Path, config: dict[str, Any]) -> None:
        weights = out / WEIGHTS[spec.kind]
        if spec.kind == "torchscript":
            write_atomic(weights, lambda p: shutil.copyfile(spec.source, p))
        else:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            save_weights(weights, state)
        for name in WEIGHT_FILES:  # a classifier of another kind left behind must not load
            if name != weights.name:
                (out / name).unlink(missing_ok=True)
        write_json(out / "config.json", config)

    return finish_classifier(
        model,
        plan,
        splits,
        rd,
        device,
        {
            "kind": spec.kind,
            "external": spec.to_dict(),
            "feature_dim": model.feature_dim,
            "attach": asdict(cfg),
        },
        temperature_scaling=cfg.temperature_scaling,
        extra={"source": spec.source},
        save=save,
    )


def load_external(rd: RunDir, cfg: dict[str, Any]) -> ExternalClassifier:
    """Rebuild a run's user classifier from RUN/classifier/ (its copy of the weights)."""
    folder = rd.stage("classifier")
    where = f"{folder / 'config.json'}"
    if not isinstance(cfg.get("external"), dict):
        raise DiffexError(f"{where} has no 'external' section")
    spec = ExternalSpec.from_dict(cfg["external"], f"{where} external")
    net = load_network(spec, folder / WEIGHTS[spec.kind])
    model = wrap(net, spec, rd.load_plan())
    model.temperature.fill_(float(cfg.get("temperature", 1.0)))
    model.feature_dim = int(cfg.get("feature_dim", 0))
    if model.feature_dim < 1:
        raise DiffexError(f"{where} has no feature_dim: attach the classifier again")
    return model
