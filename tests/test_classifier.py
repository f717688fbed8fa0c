"""Classifier stage: it learns, writes every file, reloads exactly; metric functions are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_blob_folder

from diffex.errors import DiffexError
from diffex.evaluate.classification import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    roc_auc,
)
from diffex.io.atomic import read_json
from diffex.models.classifier import ClassifierConfig, ResNetClassifier
from diffex.models.protocol import Classifier
from diffex.rundir import RunDir
from diffex.train.classifier import (
    ClassifierTrainConfig,
    augment_batch,
    gain_batch,
    load_classifier,
    predict,
    train_classifier,
)


def test_roc_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    pos = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores[pos] for b in scores[~pos]]
    assert roc_auc(scores, pos) == pytest.approx(np.mean(pairs))


def test_ece_zero_when_calibrated_and_positive_when_not() -> None:
    probs = np.array([[0.75, 0.25]] * 400)
    labels = np.array([0] * 300 + [1] * 100)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(np.array([[0.99, 0.01]] * 400), labels) > 0.2


def test_temperature_recovers_known_value() -> None:
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_metrics_confusion_and_balanced_accuracy() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(probs, np.array([0, 1, 1, 1]), ["a", "b"])
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)


def test_augment_keeps_content() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = augment_batch(x, torch.Generator().manual_seed(0))
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_gain_scales_all_channels_of_an_image_alike() -> None:
    """One gain per image, shared by its channels, applied above -1 (the low percentile) and
    clipped; the same generator state gives the same gains, and sd 0 changes nothing."""
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.6 - 0.9
    y = gain_batch(x, torch.Generator().manual_seed(0), 0.2)
    assert y.min() >= -1.0 and y.max() <= 1.0
    ratio = (y + 1.0) / (x + 1.0)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)
    gains = per_image[:, 0]
    assert gains.std() > 0.1 and (gains > 1).any() and (gains < 1).any()
    assert torch.equal(y, gain_batch(x, torch.Generator().manual_seed(0), 0.2))
    assert torch.allclose(gain_batch(x, torch.Generator().manual_seed(0), 0.0), x)
    with pytest.raises(DiffexError, match="gain_sd"):
        ClassifierTrainConfig(gain_sd=-0.1)


def test_model_satisfies_protocol() -> None:
    model = ResNetClassifier(ClassifierConfig.from_preset("tiny", 3, 32, ["a", "b"]))
    assert isinstance(model, Classifier)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    model.eval()
    assert model.features(x).shape == (5, model.feature_dim)
    assert torch.allclose(model.probs(x).sum(1), torch.ones(5))


def test_stem_stride_halves_the_first_feature_map_and_old_configs_keep_theirs() -> None:
    """Stride 2 halves the stem's output at 48 px (the demo's classifier); a config saved
    before the option loads with the old rule (1 below 64 px, 2 from 64 px), so a saved 48 px
    classifier is rebuilt as it trained; other strides fail with one line."""
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    shapes = {}
    for stride in (None, 1, 2):
        model = ResNetClassifier(ClassifierConfig.from_preset("tiny", 3, 48, ["a", "b"], stride))
        model.eval()
        shapes[stride] = model.stem(x).shape[-1]
        assert model.features(x).shape == (2, model.feature_dim)
    assert shapes == {None: 48, 1: 48, 2: 24}
    for size, legacy in ((48, 1), (64, 2)):
        saved = ClassifierConfig.from_preset("tiny", 3, size, ["a", "b"], 3 - legacy).to_dict()
        assert ClassifierConfig.from_dict(saved).stem_stride == 3 - legacy
        del saved["stem_stride"]
        assert ClassifierConfig.from_dict(saved).stem_stride == legacy
    with pytest.raises(DiffexError, match="stem_stride must be 1 or 2, got 3"):
        ClassifierConfig.from_preset("tiny", 3, 48, ["a", "b"], 3)


def test_train_classifier_learns_and_writes_everything(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=60, size=32)
    run = tmp_path / "run"
    cfg = ClassifierTrainConfig(
        image_size=32, preset="tiny", epochs=8, batch_size=16, seed=0, min_steps=1
    )
    metrics = train_classifier(data, run, cfg, torch.device("cpu"))
    folder = run / "classifier"
    for name in (
        "model.safetensors",
        "config.json",
        "metrics.json",
        "training_curve.png",
        "confusion_reliability.png",
    ):
        assert (folder / name).is_file(), name
    assert (run / "data.json").is_file()
    # two easy classes: far above chance (0.5)
    assert metrics["val"]["balanced_accuracy"] >= 0.85, metrics["val"]
    saved = read_json(folder / "metrics.json")
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "confusion_matrix", "ece"):
        assert key in saved["test"]
    # reload: same logits, frozen, eval mode
    model = load_classifier(run)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    plan = RunDir(run).load_plan()
    from diffex.data.loading import load_split

    val = load_split(plan, "val")
    probs = torch.softmax(predict(model, val.x, torch.device("cpu")) / model.temperature, 1)
    acc = float((probs.argmax(1) == val.y).float().mean())
    assert acc == pytest.approx(saved["val"]["accuracy"])


def test_training_is_deterministic(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "d", n_per_class=20, size=32)
    cfg = ClassifierTrainConfig(
        image_size=32, preset="tiny", epochs=2, batch_size=8, seed=5, min_steps=1
    )
    a = train_classifier(data, tmp_path / "r1", cfg, torch.device("cpu"))
    b = train_classifier(data, tmp_path / "r2", cfg, torch.device("cpu"))
    assert a["val"]["nll"] == b["val"]["nll"]
    wa = (tmp_path / "r1" / "classifier" / "model.safetensors").read_bytes()
    wb = (tmp_path / "r2" / "classifier" / "model.safetensors").read_bytes()
    assert wa == wb
