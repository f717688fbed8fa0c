"""GCD baseline: the search on a stub whose true direction is known, the line search, and the
command end to end on the quick demo run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffex.baselines.gcd import GCDConfig, g_direction, line_search, search
from diffex.cli import main


def _stub(dim: int, seed: int = 0) -> tuple[torch.Tensor, object]:
    """Target logit rises along a hidden unit vector u (with a mild curvature elsewhere); the
    distance is the perturbation's norm."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g)
    u = u / u.norm()
    w = torch.randn(dim, generator=g)
    w = w - (w @ u) * u
    w = w / w.norm()

    def oracle(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 3.0 * d @ u + 0.3 * (d @ w) ** 2, d.norm(dim=1)

    return u, oracle


@pytest.mark.parametrize("seed", [0, 1])
def test_g_direction_points_along_the_true_direction(seed: int) -> None:
    dim = 12
    u, oracle = _stub(dim, seed)
    res = search(oracle, dim, GCDConfig(samples=64, rounds=2, proxy_steps=300, seed=seed))
    dirs = dict(res["directions"])
    assert float(dirs["g0"] @ u) > 0.9
    assert float(dirs["g1"] @ u) > 0.9  # the distance is symmetric, so it does not bend g
    assert set(dirs) == {"g0", "g1", "h1", "h2"}
    for v in dirs.values():
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert res["fits"][-1]["samples"] == 128
    assert res["fits"][-1]["r2_logit"] > 0.9


def test_g_direction_trades_distance_against_the_logit() -> None:
    """With a distance that grows along u and a logit that grows along u and v equally, a large
    lambda turns the g-direction away from u."""
    from diffex.baselines.gcd import Proxy

    class Linear(Proxy):
        def forward(self, d: torch.Tensor) -> torch.Tensor:
            return torch.stack([d[:, 0] + d[:, 1], 2.0 * d[:, 0]], 1)

    p = Linear(2, 4)
    assert torch.allclose(g_direction(p, 2, 0.0), torch.tensor([1.0, 1.0]) / 2**0.5)
    assert torch.allclose(g_direction(p, 2, 0.5), torch.tensor([0.0, 1.0]), atol=1e-6)


def test_line_search_stops_at_the_crossing() -> None:
    calls: list[float] = []

    def along(t: float) -> float:
        calls.append(t)
        return float(1 / (1 + np.exp(-4 * (t - 1.3))))

    r = line_search(along, max_step=4.0, bisections=6)
    assert r["crossed"]
    # bracketed in (1.0, 2.0] by doubling from 0.25, then 6 halvings: within 1/64 above 1.3
    assert 1.3 <= r["step"] <= 1.3 + 1 / 64 + 1e-9
    assert r["p"] >= 0.5 and along(r["step"] - 1 / 64) < 0.5
    assert len(calls) <= 4 + 6 + 1 + 1


def test_line_search_without_a_crossing() -> None:
    r = line_search(lambda t: 0.2, max_step=2.0, bisections=3)
    assert r == {"step": 2.0, "p": 0.2, "crossed": False}
    r0 = line_search(lambda t: 0.9, max_step=2.0, bisections=3)
    assert r0["crossed"] and r0["step"] <= 2.0 / 16


def test_gcd_command_end_to_end(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    args = ["--seed", "0", "baseline", "gcd", "--run", str(run), "--samples", "8",
            "--rounds", "1", "--n-images", "6", "--ddim-steps", "4", "--m", "3",
            "--precision", "fp32"]  # fmt: skip
    assert main(args) == 0
    folder = run / "baselines" / "gcd"
    ranking = json.loads((folder / "ranking.json").read_text())
    # the precision reaches the search and the explanations alike
    assert ranking["precision"] == "fp32" and ranking["config"]["precision"] == "fp32"
    shown = json.loads((folder / "explanations" / "summary.json").read_text())
    assert shown["precision"] == "fp32"
    assert 1 <= len(ranking["directions"]) <= 3
    flips = [d["flip_rate"] for d in ranking["directions"]]
    assert flips == sorted(flips, reverse=True)
    assert (folder / "explanations" / "summary.json").is_file()
    for d in ranking["directions"]:
        assert 0 < d["step"] <= 4.0
        assert (folder / "explanations" / f"rank{d['rank']}_{d['name']}" / "strip.png").is_file()
    ev_args = ["evaluate", "--run", str(run), "--n-images", "6", "--ddim-steps", "4",
               "--cout-steps", "4", "--n-real", "8", "--imagenet-size", "32"]  # fmt: skip
    assert main(ev_args) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert "GCD" in ev["comparison"]["methods"]
    gcd_ev = json.loads((folder / "evaluation.json").read_text())
    assert gcd_ev["method"] == "gcd"
    assert [d["name"] for d in gcd_ev["directions"]] == [
        f"rank{d['rank']}_{d['name']}" for d in ranking["directions"]
    ]
    assert (
        ev["comparison"]["methods"]["GCD"]["top1_flip_rate"] == gcd_ev["directions"][0]["flip_rate"]
    )
    assert main(["report", "--run", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="baseline-gcd"' in html and "Side by side" in html


def test_gcd_bad_settings_are_one_line(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["baseline", "gcd", "--run", str(demo_run), "--source-images", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source_images" in err
    assert not (demo_run / "baselines").exists()
    assert main(["baseline", "gcd", "--run", str(demo_run), "--precision", "fp16"]) == 2
