"""Checkpoints: safetensors weights plus a JSON config, written atomically; never pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffex.errors import DiffexError
from diffex.io.atomic import read_json, write_atomic, write_json


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save a flat dict of tensors as safetensors, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda p: save_file(flat, str(p)))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load safetensors weights with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise DiffexError(f"missing checkpoint: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DiffexError(f"corrupt or unreadable checkpoint {path}: {exc}") from None


def save_module(folder: str | Path, module: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` for ``module``."""
    folder = Path(folder)
    save_weights(folder / "model.safetensors", module.state_dict())
    write_json(folder / "config.json", config)


def load_state(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load weights into ``module``; shape or key mismatches give a one-line error."""
    state = load_weights(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DiffexError(f"checkpoint {path} does not match its config: {what}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise DiffexError(
                f"checkpoint {path} does not match its config: {key} has shape "
                f"{tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    module.load_state_dict(state)
    return module


def load_config(folder: str | Path) -> dict[str, Any]:
    """Read ``folder/config.json``."""
    cfg = read_json(Path(folder) / "config.json")
    if not isinstance(cfg, dict):
        raise DiffexError(f"{Path(folder) / 'config.json'} must hold a JSON object")
    return cfg
