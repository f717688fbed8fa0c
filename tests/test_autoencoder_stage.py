"""Autoencoder stage end to end on a tiny configuration: files, metrics, exact checkpoint reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_blob_folder

from diffex.errors import DiffexError
from diffex.io.atomic import read_json
from diffex.models.unet import AttentionBlock
from diffex.runtime import resolve_precision
from diffex.train.autoencoder import AutoencoderTrainConfig, load_autoencoder, train_autoencoder
from diffex.train.classifier import ClassifierTrainConfig, train_classifier


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ae")
    data = make_blob_folder(root / "data", n_per_class=24, size=32)
    run = root / "run"
    cpu = torch.device("cpu")
    train_classifier(
        data, run, ClassifierTrainConfig(image_size=32, preset="tiny", epochs=2, min_steps=1), cpu
    )
    cfg = AutoencoderTrainConfig(
        preset="tiny",
        steps=80,
        batch_size=8,
        lr=2e-3,
        warmup_steps=5,
        sample_every=40,
        eval_images=8,
        ddim_steps=20,
        consistency_start=10,
        consistency_ramp=5,
    )
    metrics = train_autoencoder(run, cfg, cpu)
    return run, metrics


def test_stage_writes_files_and_metrics(trained_run: tuple[Path, dict]) -> None:
    run, metrics = trained_run
    out = run / "autoencoder"
    for name in (
        "model.safetensors",
        "config.json",
        "metrics.json",
        "training_curve.png",
        "reconstructions.png",
        "samples/step_000040.png",
        "samples/step_000080.png",
    ):
        assert (out / name).is_file(), name
    saved = read_json(out / "metrics.json")
    for part in ("roundtrip", "semantic_only"):
        for key in ("psnr", "ssim", "mse", "agreement", "kl", "per_class_agreement"):
            assert key in saved[part], (part, key)
    # round trips decode in the precision the autoencoder trained in, as rank and explain do
    assert saved["precision"] == resolve_precision("auto", torch.device("cpu"))
    # the exact round trip is far closer than decoding from z with fresh noise
    assert metrics["roundtrip"]["psnr"] > metrics["semantic_only"]["psnr"] + 5
    # the loss fell during training
    hist = [h["mse"] for h in metrics["history"]]
    assert sum(hist[-5:]) / 5 < sum(hist[:5]) / 5
    # the consistency term switched on after its start step
    assert any(h["consistency"] > 0 for h in metrics["history"])


def test_checkpoint_reload_gives_identical_outputs(trained_run: tuple[Path, dict]) -> None:
    run, _ = trained_run
    a = load_autoencoder(run)
    b = load_autoencoder(run)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    za, xa = a.encode(x, steps=5)
    zb, xb = b.encode(x, steps=5)
    assert torch.equal(za, zb) and torch.equal(xa, xb)
    assert torch.equal(a.decode(za, xa, steps=5), b.decode(zb, xb, steps=5))
    assert not a.classifier.training


def test_z_norm_and_attention_reach_the_saved_model(
    trained_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """``--z-norm`` and ``--attention 16,32`` on train-autoencoder build, save and reload a UNet
    that layer-normalises z_sem and attends at those sizes on its down and up paths (the tiny
    preset's 8 px is not reached at 32 px); 'none' parses to no sizes."""
    import shutil

    from diffex.cli import _attention, main

    run, _ = trained_run
    assert load_autoencoder(run).config.unet.z_norm is False
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("autoencoder"))
    args = ["--steps", "2", "--preset", "tiny", "--ddim-steps", "2", "--sample-every", "2"]
    assert (
        main(
            ["--device", "cpu", "train-autoencoder", "--run", str(copy), *args, "--z-norm"]
            + ["--attention", "16,32"]
        )
        == 0
    )
    saved = read_json(copy / "autoencoder" / "config.json")
    assert saved["model"]["unet"]["z_norm"] is True and saved["train"]["z_norm"] is True
    assert saved["train"]["attention"] == [16, 32]
    assert saved["model"]["unet"]["attn_resolutions"] == [16, 32]

    def level_attention(ae: torch.nn.Module) -> int:
        """Attention blocks on the down and up paths (the middle block's is separate)."""
        paths = [m for name, m in ae.named_modules() if name.endswith(("unet.down", "unet.up"))]
        assert len(paths) == 2
        return sum(isinstance(m, AttentionBlock) for p in paths for m in p.modules())

    assert level_attention(load_autoencoder(run)) == 0  # tiny attends at 8 px: not reached
    reloaded = load_autoencoder(copy)
    assert reloaded.config.unet.z_norm is True
    assert level_attention(reloaded) > 0
    assert (
        _attention("none") == [] and _attention(" 16, 8 ") == [16, 8] and _attention(None) is None
    )


def test_gain_margin_bounds_the_loaded_decoder(trained_run: tuple[Path, dict]) -> None:
    """``load_autoencoder(gain_margin=...)`` bounds every z-conditioned block to the range of
    the run's training latents: a training image decodes as without the bounds, a latent far
    past the data does not. A negative margin is refused by the stage configs and the CLI."""
    from diffex.cli import main
    from diffex.data.loading import load_split
    from diffex.errors import DiffexError
    from diffex.explain.explain import ExplainConfig
    from diffex.explain.rank import RankConfig
    from diffex.rundir import RunDir

    run, _ = trained_run
    free, bounded = load_autoencoder(run), load_autoencoder(run, gain_margin=0.0)
    assert all(b.gain_lo is not None for b in bounded.unet.z_blocks())
    assert all(b.gain_lo is None for b in free.unet.z_blocks())
    x = load_split(RunDir(run).load_plan(), "train").x[:2]
    with torch.no_grad():
        z = free.semantic(x)
        x_t, t = torch.randn_like(x), torch.tensor([10, 10])
        assert torch.allclose(free.unet(x_t, t, z), bounded.unet(x_t, t, z), atol=1e-5)
        far = 8 * z
        assert (free.unet(x_t, t, far) - bounded.unet(x_t, t, far)).abs().max() > 1e-4
    for cfg in (RankConfig, ExplainConfig):
        with pytest.raises(DiffexError, match="gain_margin"):
            cfg(gain_margin=-0.5)
    assert main(["rank", "--run", str(run), "--gain-margin", "-1"]) == 2


def test_class_axis_invariance_trains_and_is_recorded(
    trained_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """``axis_invariance`` > 0 adds the class-axis term from the consistency term's start on:
    it appears in the training history (zero before the start, positive after it) and in the
    saved configuration; the default leaves it out."""
    import shutil

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("autoencoder"))
    cfg = AutoencoderTrainConfig(
        preset="tiny",
        steps=8,
        batch_size=8,
        warmup_steps=1,
        sample_every=8,
        eval_images=4,
        ddim_steps=2,
        consistency_start=4,
        consistency_ramp=2,
        axis_invariance=0.5,
    )
    metrics = train_autoencoder(copy, cfg, torch.device("cpu"))
    history = metrics["history"]
    terms = {h["step"]: h.get("axis_invariance") for h in history}
    # the loop logs steps from 1; the term starts at the loop's step index 4, logged as 5
    assert all(terms.get(s) is None for s in (1, 2, 3, 4)), terms
    late = [v for s, v in terms.items() if s > 4]
    assert late and all(v is not None and v > 0 for v in late), terms
    assert read_json(copy / "autoencoder" / "config.json")["train"]["axis_invariance"] == 0.5
    assert all(
        "axis_invariance" not in h
        for h in read_json(run / "autoencoder" / "metrics.json")["history"]
    )
    with pytest.raises(DiffexError, match="axis_invariance"):
        AutoencoderTrainConfig(axis_invariance=-1.0)
    with pytest.raises(DiffexError, match="axis_reach"):
        AutoencoderTrainConfig(axis_reach=0.0)
