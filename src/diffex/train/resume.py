"""Resumable training: one safetensors file holds everything a stage needs to continue.

``RUN/<stage>/checkpoint.safetensors`` carries the model, the EMA copy, the optimiser moments,
the best weights so far, the global and named RNG states (tensors) and, in its metadata, the
step, history, evaluations and a fingerprint of the configuration (JSON). It is written
atomically (temporary file, fsync, rename), so a kill at any moment leaves either the previous
checkpoint or the new one. ``checkpoint.json`` beside it is a readable summary, never read back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from diffex.errors import DiffexError
from diffex.io.atomic import read_json, write_atomic, write_json
from diffex.stages import with_revision

if TYPE_CHECKING:
    from diffex.rundir import RunDir

FORMAT = "diffex-train-state-1"


@dataclass
class Resume:
    """Where and how often a stage checkpoints, and what must match to resume.

    ``fingerprint``: the settings that define the run (a checkpoint made with other settings is
    ignored and training starts afresh); ``generators``: the named RNGs the loss function draws
    from, saved and restored with the rest.
    """

    path: Path
    every: int
    fingerprint: dict[str, Any]
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every < 1:
            raise DiffexError(f"checkpoint_every must be >= 1, got {self.every}")


@dataclass
class TrainState:
    """A loaded checkpoint: tensors by group, and the JSON state."""

    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def save_state(
    resume: Resume,
    *,
    step: int,
    module: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
) -> None:
    """Write the whole training state at ``step`` atomically (model, EMA, optimiser, RNGs)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        tensors[f"model/{name}"] = t
    if ema is not None:
        for name, t in ema.state_dict().items():
            tensors[f"ema/{name}"] = t
    if best is not None:
        for name, t in best.items():
            tensors[f"best/{name}"] = t
    for idx, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            tensors[f"optim/{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda.{i}"] = s
    for name, gen in resume.generators.items():
        tensors[f"gen/{name}"] = gen.get_state()
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "step": str(step),
        "fingerprint": _canonical(resume.fingerprint),
        "state": json.dumps({**state, "step": step}),
    }
    write_atomic(resume.path, lambda p: save_file(flat, str(p), metadata=meta))
    summary = {k: v for k, v in state.items() if k not in ("history", "evals")}
    write_json(resume.path.with_suffix(".json"), {"step": step, **summary})


def load_state(resume: Resume) -> TrainState | None:
    """The checkpoint at ``resume.path`` if it exists and was made with the same settings.

    A damaged file gives a clear error (delete it to start afresh); one from other settings
    returns None.
    """
    path = resume.path
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DiffexError(f"{path} is not a DiffEx training checkpoint")
            if meta.get("fingerprint") != _canonical(resume.fingerprint):
                return None
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key in fh.keys():
                group, name = key.split("/", 1)
                groups.setdefault(group, {})[name] = fh.get_tensor(key)
        state = json.loads(meta["state"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise DiffexError(
            f"damaged training checkpoint {path} ({exc}); delete it to start this stage afresh"
        ) from None
    if int(state.get("step", -1)) != int(meta.get("step", -2)):
        raise DiffexError(f"damaged training checkpoint {path}: inconsistent step")
    return TrainState(groups, state)


def restore(
    ts: TrainState,
    resume: Resume,
    module: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, torch.Tensor] | None:
    """Put a checkpoint's weights, optimiser moments and RNG states back; returns the best
    weights saved with it (or None)."""
    path = resume.path
    try:
        module.load_state_dict(ts.tensors.get("model", {}))
        if ema is not None:
            ema.load_state_dict(ts.tensors.get("ema", {}))
        opt_sd = optimizer.state_dict()
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in ts.tensors.get("optim", {}).items():
            idx, name = key.split(".", 1)
            slots.setdefault(int(idx), {})[name] = value
        opt_sd["state"] = slots
        optimizer.load_state_dict(opt_sd)
        rng = ts.tensors.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        cuda = [rng[f"cuda.{i}"] for i in range(len(rng)) if f"cuda.{i}" in rng]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        gens = ts.tensors.get("gen", {})
        for name, gen in resume.generators.items():
            if name not in gens:
                raise KeyError(f"generator {name}")
            gen.set_state(gens[name])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DiffexError(
            f"training checkpoint {path} does not match this model ({str(exc).splitlines()[0]});"
            " delete it to start this stage afresh"
        ) from None
    return ts.tensors.get("best")


def digest(obj: Any) -> str:
    """Short SHA-256 of a JSON-able object (for fingerprints)."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes (for fingerprints of upstream weights)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DiffexError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()[:16]


def stage_settings(cfg: Any) -> dict[str, Any]:
    """A stage config as a dict, without the settings that do not change the result."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every",)}


def stage_resume(
    run: RunDir,
    stage: str,
    cfg: Any,
    generators: dict[str, torch.Generator],
    name: str = "checkpoint",
    **upstream: str,
) -> Resume:
    """The checkpoint of a stage: ``RUN/<stage>/<name>.safetensors``, fingerprinted by the
    stage's settings and code revision (:func:`diffex.stages.code_revision`) plus ``upstream``
    digests (data plan, weights it builds on)."""
    config = with_revision(stage, stage_settings(cfg))
    fingerprint = {"stage": stage, "config": config, **upstream}
    path = run.stage(stage) / f"{name}.safetensors"
    return Resume(path, cfg.checkpoint_every, fingerprint, generators)


def weights_digest(run: RunDir, stage: str) -> str:
    """Digest of a finished upstream stage's weights (with its config when the weights alone do
    not fix its behaviour: a user's classifier with its declared input handling)."""
    weights = run.weights(stage)
    config = weights.parent / "config.json"
    external = config.is_file() and "external" in read_json(config)
    if weights.name == "model.safetensors" and not external:
        return file_digest(weights)
    return file_digest(weights)[:8] + file_digest(config)[:8]
