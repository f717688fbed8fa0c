"""Checkpoints: safetensors + JSON, atomic writes, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffex.errors import DiffexError
from diffex.io.atomic import read_json, write_atomic, write_json
from diffex.io.checkpoint import load_state, load_weights, save_module


def test_module_roundtrip(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    save_module(tmp_path / "m", net, {"width": 3})
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    load_state(other, tmp_path / "m" / "model.safetensors")
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert read_json(tmp_path / "m" / "config.json") == {"width": 3}


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def broken(p: Path) -> None:
        p.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiffexError, match="No space left"):
        write_atomic(target, broken)
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_truncated_checkpoint(tmp_path: Path) -> None:
    net = torch.nn.Linear(8, 8)
    save_module(tmp_path, net, {})
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DiffexError, match="corrupt or unreadable"):
        load_weights(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    save_module(tmp_path, torch.nn.Linear(8, 8), {})
    with pytest.raises(DiffexError, match="does not match its config"):
        load_state(torch.nn.Linear(8, 4), tmp_path / "model.safetensors")


def test_broken_json(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(DiffexError, match="not valid JSON"):
        read_json(tmp_path / "c.json")
