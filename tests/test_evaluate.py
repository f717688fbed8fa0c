"""Evaluation metrics against hand-computed values, and the evaluate command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from diffex.cli import main
from diffex.data.display import composite
from diffex.data.spec import load_spec
from diffex.errors import DiffexError
from diffex.evaluate.counterfactual import cout, effect, proximity
from diffex.evaluate.features import rgb_composite
from diffex.evaluate.groundtruth import expected_signs, recovery
from diffex.evaluate.realism import frechet_distance, kid
from diffex.evaluate.run import EvaluateConfig


def _probs_sum(x: torch.Tensor) -> torch.Tensor:
    """Two-class stub: p(class 1) = sum of pixels / 1.5."""
    p1 = (x.sum(dim=(1, 2, 3)) / 1.5).clamp(0, 1)
    return torch.stack([1 - p1, p1], dim=1)


def test_cout_two_pixel_example() -> None:
    # changes 1.0 and 0.5: the first pixel goes in first. With 2 steps the inserted images are
    # [0, 0], [1, 0], [1, 0.5] -> p1 = 0, 2/3, 1 and p0 = 1, 1/3, 0; p1 - p0 = -1, 1/3, 1.
    # Trapezoid over [0, 0.5, 1]: 0.5 * ((-1 + 1/3) / 2 + (1/3 + 1) / 2) = 1/6.
    x0 = torch.zeros(1, 1, 1, 2)
    x1 = torch.tensor([[[[1.0, 0.5]]]])
    c = cout(_probs_sum, x0, x1, np.array([0]), target=1, steps=2)
    assert c["cout"] == pytest.approx(1 / 6, abs=1e-6)
    np.testing.assert_allclose(c["p_target"], [0, 2 / 3, 1], atol=1e-6)
    # the order follows the size of the change, not the position: mirrored pixels, same COUT
    x1r = torch.tensor([[[[0.5, 1.0]]]])
    assert cout(_probs_sum, x0, x1r, np.array([0]), 1, steps=2)["cout"] == pytest.approx(1 / 6)
    swapped = torch.tensor([[[[0.2, 1.0]]]])  # the 1.0 goes in first: p1 = 0, 2/3, 0.8
    assert cout(_probs_sum, x0, swapped, np.array([0]), 1, steps=2)["cout"] == pytest.approx(
        0.5 * ((-1 + 1 / 3) / 2 + (1 / 3 + (2 * 1.2 / 1.5 - 1)) / 2), abs=1e-6
    )


def test_cout_bounds_and_no_change() -> None:
    x = torch.rand(3, 2, 4, 4) * 0.1
    c = cout(_probs_sum, x, x.clone(), np.array([0, 0, 0]), target=1, steps=5)
    # no change: every step equals the start, so COUT = p1 - p0 of the unedited image
    p = _probs_sum(x)
    np.testing.assert_allclose(c["per_image"], (p[:, 1] - p[:, 0]).numpy(), atol=1e-6)
    assert -1 <= c["cout"] <= 1


def test_effect_and_proximity_by_hand() -> None:
    p0 = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    p1 = np.array([[0.3, 0.7], [0.7, 0.3], [0.1, 0.9]])
    e = effect(p0, p1, target=1)
    assert e["mean_delta_p"] == pytest.approx((0.6 - 0.1 + 0.1) / 3)
    assert e["flip_rate"] == pytest.approx(1 / 3)  # the third was already the target
    a = np.zeros((2, 1, 1, 2))
    b = np.array([[[[0.5, 0.5]]], [[[1.0, 0.0]]]])
    pr = proximity(a, b)
    assert pr["l1"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.0) / 4)
    assert pr["l2"] == pytest.approx((0.5 + np.sqrt(0.5)) / 2)


def test_fid_identical_shifted_and_against_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 0.3
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    # fewer samples than dimensions still works (singular covariances)
    c = rng.normal(size=(10, 50))
    assert frechet_distance(c, c) == pytest.approx(0.0, abs=1e-8)


def test_kid_hand_value_and_separation() -> None:
    x = np.array([[0.0], [1.0]])
    y = np.array([[2.0], [3.0]])
    # k = (u v + 1)^3: off-diagonal means 1 (x) and 343 (y); cross mean (1+1+27+64)/4 = 23.25
    assert kid(x, y, subsets=1)["mean"] == pytest.approx(1 + 343 - 2 * 23.25)
    rng = np.random.default_rng(1)
    same = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)))["mean"]
    far = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0)["mean"]
    assert abs(same) < 0.02 < far


def _dir(name: str, **feats: tuple[float, float]) -> dict:
    return {
        "name": name,
        "features": {f: {"rho": r, "fraction_of_gap": g} for f, (r, g) in feats.items()},
    }


def test_recovery_and_leakage_on_a_known_stub() -> None:
    signs = {"nucleus_area": 1, "spot_count": 1, "elongation": 1, "actin_intensity": -1}
    dirs = [
        _dir("a", nucleus_area=(0.9, 1.0), cell_area=(0.2, float("nan"))),
        _dir("b", spot_count=(0.8, 3.0), actin_intensity=(-0.7, 0.8), noise=(-0.45, float("nan"))),
        _dir("c", elongation=(-0.9, -1.0), offset_x=(0.1, float("nan"))),
    ]
    gt = recovery(dirs, signs, ["cell_area", "noise", "offset_x", "rotation"])
    # nucleus: yes (a). spots: overshoot 3x gap -> no. elongation: wrong sign -> no.
    # actin: rho -0.7, 0.8 of the gap -> yes (b).
    assert gt["factors"]["nucleus_area"]["by"] == ["a"]
    assert not gt["factors"]["spot_count"]["recovered"]
    assert not gt["factors"]["elongation"]["recovered"]
    assert gt["factors"]["actin_intensity"]["by"] == ["b"]
    assert gt["recovery"] == pytest.approx(0.5)
    assert gt["leakage"] == pytest.approx(0.45)
    assert gt["worst_leak"]["factor"] == "noise"
    assert gt["leakage_forward"] is None and gt["worst_leak_forward"] is None  # not measured
    dirs[1]["features"]["noise"]["rho_forward"] = 0.05
    dirs[0]["features"]["cell_area"]["rho_forward"] = -0.2
    fwd = recovery(dirs, signs, ["cell_area", "noise", "offset_x", "rotation"])
    assert fwd["leakage"] == pytest.approx(0.45)  # the full sweep's number is unchanged
    assert fwd["leakage_forward"] == pytest.approx(0.2)
    assert fwd["worst_leak_forward"] == {"direction": "a", "factor": "cell_area", "rho": -0.2}
    weak = recovery([_dir("w", nucleus_area=(0.5, 1.0))], {"nucleus_area": 1}, [])
    assert weak["recovery"] == 0.0


def test_expected_signs_from_the_default_spec() -> None:
    spec = load_spec(None)
    s = expected_signs(spec, "control", "treated")
    assert s == {"nucleus_area": 1, "spot_count": 1, "elongation": 1, "actin_intensity": -1}
    assert expected_signs(spec, "treated", "control")["actin_intensity"] == 1


def test_rgb_composite_matches_the_figures() -> None:
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    colors = ["#3b6cff", "#3bd15a", "#ff4fd8"]
    ours = rgb_composite(x, colors).numpy()
    for i in range(2):
        ref = composite(((x[i].numpy() + 1) / 2), colors).astype(np.float64) / 255
        np.testing.assert_allclose(ours[i].transpose(1, 2, 0), ref, atol=1 / 255 + 1e-6)


def test_efficientnet_lite0_recognises_imagenet_photos() -> None:
    """The shipped weights in our network: scikit-image's bundled cat and coffee photos."""
    from skimage import data

    from diffex.models.efficientnet import load_lite0

    net = load_lite0()
    for img, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967, 968))):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top = int(net(x).argmax())
        assert top in classes


def test_evaluation_json_follows_the_schema(demo_run: Path) -> None:
    import jsonschema

    schema = json.loads(
        (Path(__file__).parents[1] / "src/diffex/evaluate/evaluation.schema.json").read_text()
    )
    text = (demo_run / "evaluation.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    ev = json.loads(text)
    jsonschema.validate(ev, schema)
    assert ev["fidelity"]["n"] == 8
    names = [d["name"] for d in ev["directions"]]
    assert names[-1] == "reference_class_mean"
    assert ev["ground_truth"] is not None  # the demo's data came with a spec
    assert set(ev["ground_truth"]["factors"]) == {
        "nucleus_area",
        "spot_count",
        "elongation",
        "actin_intensity",
    }
    sens = ev["ground_truth"]["classifier_sensitivity"]
    assert sens["n_cells"] == 32 and sens["target_class"] == "treated"
    kinds = {f: v["kind"] for f, v in sens["factors"].items()}
    assert kinds["nucleus_area"] == "causal" and kinds["noise"] == "nuisance"
    assert kinds["all causal"] == "combined" and "rotation" not in kinds
    for fig in ev["figures"]:
        assert (demo_run / fig).is_file()
    broken = dict(ev, fidelity={"n": 0})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_evaluate_without_ranking_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err


def test_abs_cosine_matrix_by_hand() -> None:
    from diffex.evaluate.disentangle import abs_cosine_matrix, max_off_diagonal

    m = abs_cosine_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]))
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(m, [[1, r, 0], [r, 1, r], [0, r, 1]], atol=1e-12)
    assert max_off_diagonal(m, 2) == pytest.approx(r)
    assert np.isnan(max_off_diagonal(m, 1))


def test_pixel_metrics_and_agreement_by_hand() -> None:
    from diffex.evaluate.fidelity import classifier_agreement, pixel_metrics

    x = -torch.ones(2, 3, 16, 16)  # 0 on the [0, 1] scale
    y = x + 0.2  # 0.1 on the [0, 1] scale
    m = pixel_metrics(x, y)
    assert m["mse"] == pytest.approx(0.01, rel=1e-5)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert pixel_metrics(x, x)["ssim"] == pytest.approx(1.0)

    class Stub:
        def probs(self, t: torch.Tensor) -> torch.Tensor:  # p(class 1) = mean pixel on 0..1
            p1 = ((t + 1) / 2).mean(dim=(1, 2, 3))
            return torch.stack([1 - p1, p1], 1)

    a = torch.tensor([-1.0, 0.6]).reshape(2, 1, 1, 1)  # p1 = 0 and 0.8
    b = torch.tensor([0.0, 0.6]).reshape(2, 1, 1, 1)  # p1 = 0.5 and 0.8
    agree = classifier_agreement(Stub(), a, b)
    # image 1: argmax 0 -> tie at 0.5 (argmax 0): agrees; image 2 identical
    assert agree["agreement"] == 1.0
    kl1 = 1.0 * np.log(1.0 / 0.5)  # KL([1, 0] || [0.5, 0.5])
    assert agree["kl"] == pytest.approx(kl1 / 2, rel=1e-5)


@pytest.mark.parametrize("compare", ["nolabel", "other=/nonexistent/run"])
def test_bad_compare_is_one_line_before_any_work(
    demo_run: Path, compare: str, capsys: pytest.CaptureFixture
) -> None:
    before = (demo_run / "evaluation.json").stat().st_mtime_ns
    assert main(["evaluate", "--run", str(demo_run), "--compare", compare]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and compare.split("=")[-1] in err
    assert (demo_run / "evaluation.json").stat().st_mtime_ns == before  # nothing rewritten


def test_compare_with_another_classifier_is_refused(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(demo_run, other)
    with open(other / "classifier" / "model.safetensors", "ab") as fh:
        fh.write(b"\0")  # different bytes: not the same classifier
    assert main(["evaluate", "--run", str(demo_run), "--compare", f"x={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "classifier/model.safetensors differs" in err


def _actin_probe(x: torch.Tensor) -> torch.Tensor:
    """Two-class stub that reads only the actin channel: less actin -> more 'treated'."""
    mean_actin = (x[:, 1] + 1).mean(dim=(1, 2)) / 2
    p1 = torch.sigmoid(-60.0 * (mean_actin - 0.12))
    return torch.stack([1 - p1, p1], dim=1)


def test_classifier_sensitivity_finds_what_a_stub_classifier_reads() -> None:
    from diffex.evaluate.sensitivity import classifier_sensitivity

    spec = load_spec(None)
    sens = classifier_sensitivity(
        _actin_probe, lambda u: u * 2 - 1, spec, "control", "treated", 1, size=32, n_cells=24
    )
    f = sens["factors"]
    # each causal factor moves by its class gap in the spec's units, nuisances by one sd
    assert f["actin_intensity"]["shift"] == pytest.approx(-1.0 * 0.07)
    assert f["nucleus_area"]["shift"] == pytest.approx(1.8 * 25)
    assert f["spot_count"]["shift"] == pytest.approx(1.6 * 3.5)
    assert f["background"]["shift"] == pytest.approx(0.02) and f["background"]["shift_sd"] == 1
    # the stub reads actin: less actin raises p(treated); the puncta channel it never reads
    assert f["actin_intensity"]["mean_delta_p"] > 0.05
    assert abs(f["spot_count"]["mean_delta_p"]) < 0.2 * f["actin_intensity"]["mean_delta_p"]
    # a brighter background raises mean actin too: the probe shows the shortcut as negative
    assert f["background"]["mean_delta_p"] < -0.05
    lo, hi = f["actin_intensity"]["delta_p_ci"]
    assert lo <= f["actin_intensity"]["mean_delta_p"] <= hi
    assert 0.0 <= f["all causal"]["flip_rate"] <= 1.0
    again = classifier_sensitivity(
        _actin_probe, lambda u: u * 2 - 1, spec, "control", "treated", 1, size=32, n_cells=24
    )
    assert again == sens  # seeded
    with pytest.raises(DiffexError, match="'mutant'"):
        classifier_sensitivity(_actin_probe, lambda u: u, spec, "control", "mutant", 1, size=32)


def test_morphology_roundtrip_by_hand() -> None:
    from diffex.data.synth import render_cell
    from diffex.evaluate.fidelity import morphology_roundtrip

    rng = np.random.default_rng(0)
    real = np.stack(
        [
            render_cell({"nucleus_area": a, "spot_count": c}, 48, rng)
            for a, c in zip((100, 130, 160, 190, 220, 250), (4, 6, 8, 10, 12, 14), strict=True)
        ]
    )
    same = morphology_roundtrip(real, real.copy())
    assert same["nucleus_area"]["r"] == pytest.approx(1.0)
    assert same["nucleus_area"]["pct_change"] == pytest.approx(0.0)
    assert same["spot_count"]["n"] == 6 and "rotation" not in same
    copy = real.copy()
    copy[:, 2] = 0.06  # puncta erased: a flat spots channel at the background level
    lost = morphology_roundtrip(real, copy)
    assert lost["spot_count"]["copy_mean"] == 0.0
    assert lost["spot_count"]["pct_change"] == pytest.approx(-100.0)
    assert lost["spot_count"]["r"] is None or np.isnan(lost["spot_count"]["r"])
    assert lost["nucleus_area"]["r"] == pytest.approx(1.0)  # other channels untouched
    # a denoised copy (the same factors, no pixel noise) keeps its puncta: counted with the real
    # cells' spot-noise floor, not with its own near-zero noise
    clean = np.stack(
        [
            render_cell({"nucleus_area": a, "spot_count": c, "noise": 0.0}, 48, rng)
            for a, c in zip((100, 130, 160, 190, 220, 250), (4, 6, 8, 10, 12, 14), strict=True)
        ]
    )
    kept = morphology_roundtrip(real, clean)
    assert abs(kept["spot_count"]["pct_change"]) < 15
    assert kept["spot_count"]["r"] > 0.9


def test_sensitivity_skips_data_not_made_by_synth(tmp_path: Path) -> None:
    from diffex.evaluate.run import EvaluateConfig, _sensitivity

    spec = load_spec(None)
    args = (spec, None, "control", 1, _actin_probe, EvaluateConfig())
    assert _sensitivity(tmp_path, *args) is None  # no dataset.json
    (tmp_path / "dataset.json").write_text('{"generator": "my microscope"}')
    assert _sensitivity(tmp_path, *args) is None
    (tmp_path / "dataset.json").write_text("{broken")
    assert _sensitivity(tmp_path, *args) is None  # warned, and the evaluation goes on


def test_too_few_sensitivity_cells_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert main(["evaluate", "--run", str(run), "--sensitivity-cells", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sensitivity-cells" in err and "Traceback" not in err
    with pytest.raises(DiffexError, match="sensitivity_cells"):
        EvaluateConfig(sensitivity_cells=1)
