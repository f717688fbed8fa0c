"""Bring your own classifier: TorchScript and entry points attach to a run, behave exactly like the
user's network, reload from the run's own copy, and every invalid case is one clear line."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_blob_folder

from diffex.cli import main
from diffex.data.loading import load_split
from diffex.io.atomic import read_json
from diffex.models.external import ExternalClassifier, ExternalSpec
from diffex.models.protocol import Classifier
from diffex.rundir import RunDir
from diffex.train.classifier import load_classifier

#: A user's module: a 3x3 local mean, 4x4 pooling and a linear head that thresholds the mean
#: brightness (large discs are class "b"); only 32-px inputs fit the head. ``make`` jitters the
#: weights on every call, so a run must keep its own copy.
USER_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class DiscNet(nn.Module):
        def __init__(self, n_out: int = 2, k: float = 60.0, thr: float = 0.21) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.pool = nn.AvgPool2d(4)
            self.head = nn.Linear(4 * 8 * 8, n_out)
            with torch.no_grad():
                self.body[0].weight.fill_(1.0 / 27)
                self.body[0].bias.zero_()
                sign = torch.tensor([-1.0, 1.0] + [0.0] * (n_out - 2))[:n_out]
                self.head.weight.copy_(sign[:, None].expand(n_out, 256) * k / 256)
                self.head.bias.copy_(-sign * k * thr)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(self.body(x)).flatten(1))

        @torch.jit.export
        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).mean(dim=(2, 3))


    def make() -> nn.Module:
        net = DiscNet()
        with torch.no_grad():
            net.body[0].weight.add_(torch.randn(net.body[0].weight.shape) * 1e-3)
        return net


    def make_swapped() -> nn.Module:
        net = make()
        with torch.no_grad():  # output 0 is now "b" (large discs), output 1 is "a"
            net.head.weight.copy_(net.head.weight.flip(0))
            net.head.bias.copy_(net.head.bias.flip(0))
        return net


    def make3() -> nn.Module:
        return DiscNet(n_out=3)


    class NaNNet(DiscNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")


    def make_nan() -> nn.Module:
        return NaNNet()


    def not_a_module() -> str:
        return "a string"
    """
)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Blob data, the user's module file and a TorchScript export of it."""
    root = tmp_path_factory.mktemp("byo")
    data = make_blob_folder(root / "blobs", n_per_class=24)
    code = root / "userclf.py"
    code.write_text(USER_CODE)
    sys.path.insert(0, str(root))
    try:
        import userclf
    finally:
        sys.path.remove(str(root))
    script = root / "disc.pt"
    torch.jit.save(torch.jit.script(userclf.DiscNet()), str(script))
    return {"root": root, "data": data, "code": code, "script": script, "module": userclf}


def _attach(run: Path, data: Path, *extra: str) -> int:
    return main(
        ["--device", "cpu", "use-classifier", "--data", str(data), "--run", str(run), *extra]
    )


def test_torchscript_classifier_attaches_and_matches_the_network(
    user: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert (
        _attach(
            run,
            user["data"],
            "--classifier-script",
            str(user["script"]),
            "--image-size",
            "32",
            "--features",
            "features",
        )
        == 0
    )
    folder = run / "classifier"
    assert (folder / "model.pt").is_file() and not (folder / "model.safetensors").exists()
    metrics = read_json(folder / "metrics.json")
    assert metrics["test"]["accuracy"] >= 0.9  # the hand-set threshold separates the discs
    clf = load_classifier(run)
    assert isinstance(clf, Classifier) and clf.feature_dim == 4
    plan = RunDir(run).load_plan()
    x = load_split(plan, "test").x[:6]
    raw = torch.jit.load(str(user["script"]))
    unit = torch.from_numpy(plan.normalization.to_unit(x))  # the file's pixels over 255
    with torch.no_grad():
        assert torch.allclose(clf.logits(x), raw(unit), atol=1e-5)
        assert torch.allclose(clf.features(x), raw.features(unit), atol=1e-6)
        t = float(read_json(folder / "config.json")["temperature"])
        assert torch.allclose(clf.probs(x), torch.softmax(raw(unit) / t, 1), atol=1e-5)
    # gradients reach the input through the frozen network (the autoencoder's consistency loss)
    xg = x.clone().requires_grad_(True)
    clf.logits(xg)[:, 1].sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in clf.parameters())


def test_entry_point_reloads_the_runs_copy_with_hooked_features_and_class_order(
    user: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    entry = f"{user['code']}:make_swapped"
    assert (
        _attach(
            run,
            user["data"],
            "--classifier-entry",
            entry,
            "--image-size",
            "32",
            "--features",
            "body",
            "--class-names",
            "b,a",
        )
        == 0
    )
    assert (run / "classifier" / "model.safetensors").is_file()
    plan = RunDir(run).load_plan()
    x = load_split(plan, "test").x[:6]
    first, second = load_classifier(run), load_classifier(run)
    with torch.no_grad():
        assert torch.equal(first.logits(x), second.logits(x))  # the copy, not a fresh factory
        fresh = user["module"].make_swapped()
        unit = torch.from_numpy(plan.normalization.to_unit(x))
        assert not torch.allclose(fresh(unit)[:, [1, 0]], first.logits(x), atol=1e-7)
        # the network's output 0 is "b": DiffEx's column 0 ("a") is the network's column 1
        net = first.net
        assert torch.allclose(first.logits(x), net(unit)[:, [1, 0]], atol=1e-5)
        feats = first.features(x)
    assert feats.shape == (6, 4)  # the "body" map, averaged over space
    # declared in the network's order, the classes still come out right
    acc = read_json(run / "classifier" / "metrics.json")["test"]["accuracy"]
    assert acc >= 0.9


def test_prepare_undoes_the_runs_normalisation_resizes_and_repeats_grey() -> None:
    net = torch.nn.Identity()
    spec = ExternalSpec(
        kind="entry", source="m:f", input_size=8, in_channels=3, mean=[0.5], std=[0.25]
    )
    clf = ExternalClassifier(net, spec, ["a", "b"], 16, 1, low=[0.2], high=[0.6])
    x = torch.full((1, 1, 16, 16), 0.5)  # 3/4 of the way from low to high: pixel 0.5
    out = clf.prepare(x)
    assert out.shape == (1, 3, 8, 8)
    assert torch.allclose(out, torch.full_like(out, (0.5 - 0.5) / 0.25 + 0.0), atol=1e-6)
    x = torch.full((1, 1, 16, 16), -1.0)  # pixel 0.2 -> (0.2 - 0.5) / 0.25
    assert torch.allclose(clf.prepare(x), torch.full((1, 3, 8, 8), -1.2), atol=1e-6)
    model_scale = ExternalSpec(kind="entry", source="m:f", pixel_scale="model")
    same = ExternalClassifier(net, model_scale, ["a", "b"], 16, 1, low=[0.2], high=[0.6])
    assert torch.equal(same.prepare(x), x)


def test_autoencoder_trains_through_a_torchscript_classifier(
    user: dict[str, Path], tmp_path: Path
) -> None:
    from diffex.train.autoencoder import AutoencoderTrainConfig, load_autoencoder, train_autoencoder

    run = tmp_path / "run"
    assert (
        _attach(run, user["data"], "--classifier-script", str(user["script"]), "--image-size", "32")
        == 0
    )
    cfg = AutoencoderTrainConfig(
        preset="tiny",
        steps=4,
        batch_size=4,
        warmup_steps=1,
        sample_every=4,
        eval_images=4,
        ddim_steps=2,
        consistency_start=0,
        consistency_ramp=1,
    )
    metrics = train_autoencoder(run, cfg, torch.device("cpu"))
    assert np.isfinite(metrics["roundtrip"]["psnr"])
    model = load_autoencoder(run)
    assert model.classifier.feature_dim == 2  # no --features: the logits


BAD = [
    (["--classifier-script", "{root}/missing.pt"], "classifier script not found"),
    (["--classifier-script", "{root}/garbage.pt"], "cannot load TorchScript classifier"),
    (["--classifier-script", "{script}", "--input-size", "40"], "failed on a batch of"),
    (["--classifier-entry", "{code}:make3"], "returns 3 class scores but the data has 2"),
    (["--classifier-entry", "{code}:make_nan"], "NaN or infinite logits"),
    (["--classifier-entry", "{code}:not_a_module"], "returned str, not a torch.nn.Module"),
    (["--classifier-entry", "{code}:nothing"], "has no callable 'nothing'"),
    (["--classifier-entry", "no_such_module_xyz:make"], "cannot import module"),
    (["--classifier-entry", "make"], "must look like module:factory"),
    (["--classifier-entry", "{code}:make", "--class-names", "a,c"], "declares classes"),
    (["--classifier-entry", "{code}:make", "--features", "neck"], "no layer or method 'neck'"),
    (["--classifier-script", "{script}", "--features", "body"], "has no method 'body'"),
    (["--classifier-entry", "{code}:make", "--in-channels", "2"], "takes 2 channel(s)"),
    (["--classifier-entry", "{code}:make", "--mean", "0.5,0.5"], "give both --mean and --std"),
    (["--classifier-entry", "{code}:make", "--mean", "1,2", "--std", "1,1"], "--mean has 2"),
    (["--classifier-entry", "{code}:make", "--mean", "x", "--std", "1"], "--mean must be"),
    (["--classifier-script", "{script}", "--classifier-entry", "{code}:make"], "not both"),
    ([], "give --classifier-script"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_invalid_classifiers_fail_in_one_line(
    user: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (user["root"] / "garbage.pt").write_bytes(b"\x00not a zip archive" * 20)
    fill = {"root": user["root"], "script": user["script"], "code": user["code"]}
    argv = [a.format(**fill) for a in args]
    run = tmp_path / "run"
    capsys.readouterr()
    assert _attach(run, user["data"], "--image-size", "32", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert "Traceback" not in err
    assert not (run / "classifier" / "config.json").exists()  # nothing half-written


def test_demo_explains_a_users_classifier_end_to_end(
    tmp_path: Path, user: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """diffex demo --data DATA --classifier-script FILE: every stage runs on the user's network."""
    data = make_blob_folder(tmp_path / "blobs", n_per_class=60)
    run = tmp_path / "run"
    argv = ["--device", "cpu", "demo", "--data", str(data), "--preset", "quick", "--out", str(run)]
    script = ["--classifier-script", str(user["script"]), "--features", "features"]
    assert main([*argv, *script]) == 0
    capsys.readouterr()
    cfg = read_json(run / "classifier" / "config.json")
    assert cfg["kind"] == "torchscript" and cfg["feature_dim"] == 4
    plan = RunDir(run).load_plan()
    test = load_split(plan, "test")
    raw = torch.jit.load(str(user["script"]))
    with torch.no_grad():
        pred = raw(torch.from_numpy(plan.normalization.to_unit(test.x))).argmax(1)
    expected = float((pred == test.y).float().mean())
    assert expected > 0.7  # the hand-set threshold works on these discs
    accuracy = read_json(run / "classifier" / "metrics.json")["test"]["accuracy"]
    assert accuracy == pytest.approx(expected)  # scores are the user's network's own
    for name in (
        "autoencoder/model.safetensors",
        "ranking.json",
        "explanations/summary.json",
        "evaluation.json",
    ):
        assert (run / name).is_file(), name
    html = (run / "report.html").read_text()
    assert "Your classifier (torchscript" in html
    # the classifier-aware latent really uses the user's network: its probabilities feed z_sem
    from diffex.train.autoencoder import load_autoencoder

    ae = load_autoencoder(run)
    assert ae.classifier.spec.source == str(user["script"])
    # a different classifier invalidates every later stage instead of reusing them (--until
    # stops after the autoencoder; the stale later stages then block the report)
    report_time = (run / "report.html").stat().st_mtime_ns
    assert (
        main([*argv, "--classifier-entry", f"{user['code']}:make", "--until", "autoencoder"]) == 0
    )
    captured = capsys.readouterr()
    assert "autoencoder" in captured.out.split("time:")[-1]
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert "directions, rank, explain, evaluate" in err and "no report" in err
    assert (run / "report.html").stat().st_mtime_ns == report_time
    assert read_json(run / "classifier" / "config.json")["kind"] == "entry"
