"""Reliability: numerical faults, config validation on load, safe loading only."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_blob_folder
from test_bad_input import assert_one_line_error, run_cli, train

import diffex
from diffex.errors import DiffexError
from diffex.train.classifier import load_classifier
from diffex.train.loop import LoopConfig, run_loop
from diffex.train.resume import Resume, load_state

SRC = Path(diffex.__file__).parent


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    ckpt = tmp_path / "checkpoint.safetensors"
    resume = Resume(ckpt, every=2, fingerprint={"t": 1})

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        loss = m(batch).pow(2).mean()
        return {"loss": loss * (math.nan if step == 4 else 1.0)}

    batches = iter(lambda: torch.randn(4, 3), None)
    with pytest.raises(DiffexError) as exc:
        run_loop(model, loss_fn, batches, LoopConfig(steps=10), torch.device("cpu"), resume=resume)
    msg = str(exc.value)
    assert "step 5" in msg and str(ckpt) in msg and "learning rate" in msg and "\n" not in msg
    state = load_state(resume)
    assert state is not None and state.step == 4
    assert all(torch.isfinite(t).all() for t in state.tensors["model"].values())


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cfg")
    data = make_blob_folder(root / "d", n_per_class=8)
    from diffex.cli import main

    assert main(train(data, root / "r")) == 0
    return root / "r"


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"dropout": 2.0}, "dropout"),
        ({"widths": "wide"}, "model.widths"),
        ({"widths": [32, -4, 8, 8]}, "widths"),
        ({"colour": "red"}, "'colour'"),
        ({"image_size": "64"}, "model.image_size"),
    ],
)
def test_tampered_model_config_names_the_key(
    classifier_run: Path, tmp_path: Path, change: dict, needle: str
) -> None:
    run = tmp_path / "r"
    (run / "classifier").mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (run / "classifier" / name).write_bytes((classifier_run / "classifier" / name).read_bytes())
    cfg = json.loads((run / "classifier" / "config.json").read_text())
    cfg["model"].update(change)
    (run / "classifier" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffexError) as exc:
        load_classifier(run)
    msg = str(exc.value)
    assert needle in msg and "config.json" in msg and "\n" not in msg


def test_tampered_data_plan_via_cli(
    classifier_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = json.loads((classifier_run / "data.json").read_text())
    plan["image_size"] = "big"
    run = tmp_path / "r"
    run.mkdir()
    (run / "data.json").write_text(json.dumps(plan))
    code, err = run_cli(["train-autoencoder", "--run", str(run)], capsys)
    assert_one_line_error(code, err, "image_size", "data.json")


def test_tampered_checkpoint_bytes(classifier_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "classifier").mkdir(parents=True)
    blob = bytearray((classifier_run / "classifier" / "model.safetensors").read_bytes())
    blob[8:40] = b"{" * 32  # header garbage
    (run / "classifier" / "model.safetensors").write_bytes(bytes(blob))
    (run / "classifier" / "config.json").write_bytes(
        (classifier_run / "classifier" / "config.json").read_bytes()
    )
    with pytest.raises(DiffexError, match="model.safetensors"):
        load_classifier(run)


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def test_package_never_unpickles() -> None:
    """No pickle, no torch.load without weights_only=True, no numpy allow_pickle."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib"} for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
        for name, call in _calls(tree):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                if kw.get("weights_only") != "True":
                    offenders.append(f"{path.name}:{call.lineno} torch.load without weights_only")
            if kw.get("allow_pickle") not in (None, "False"):
                offenders.append(f"{path.name}:{call.lineno} allow_pickle")
    assert not offenders, offenders
    assert list(SRC.rglob("*.py")), "package sources not found"


def test_damaged_training_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DiffexError) as exc:
        load_state(Resume(ckpt, every=1, fingerprint={}))
    assert str(ckpt) in str(exc.value) and "delete it" in str(exc.value)
