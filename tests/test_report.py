"""The HTML report: self-contained, sections left out when missing, user text escaped, and in a
real headless browser (Debian's chromium, never a downloaded one): loads without console errors,
the slider steps through frames and probabilities, and a hostile class name stays text."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import FAST_CLASSIFIER, make_blob_folder

from diffex.cli import main
from diffex.report.html import build_report

ARTIFACTS = Path(
    os.environ.get("DIFFEX_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)
HOSTILE = "<script>alert(1)</script>"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose class is literally named <script>alert(1)</script>."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_blob_folder(root / "d", n_per_class=8, classes=("ctrl", "treat"))
    lines = ["path,label"]
    for cls, label in (("ctrl", "control & co"), ("treat", HOSTILE)):
        lines += [f'{p.relative_to(data)},"{label}"' for p in sorted((data / cls).glob("*.png"))]
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = root / "run"
    args = ["--device", "cpu", "train-classifier", "--data", str(data / "manifest.csv")]
    args += ["--run", str(run), *FAST_CLASSIFIER]
    assert main(args) == 0
    build_report(run)
    return run


def test_report_is_self_contained(demo_run: Path) -> None:
    html = (demo_run / "report.html").read_text(encoding="utf-8")
    for section in ("summary", "classifier", "autoencoder", "directions", "evaluation"):
        assert f'<section id="{section}">' in html
    assert "Side by side" in html  # DiffEx beside the class-mean reference
    assert "demo preset <b>quick</b>" in html  # the demo names its preset in the header
    assert 'id="baseline-gcd"' not in html  # GCD has not run here: left out
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert "http://" not in html and "https://" not in html
    assert html.count('class="sweep"') >= 1
    # ground truth: each causal factor with the classifier's own response and the round trip's r
    assert "<th>classifier response</th><th>round trip r</th>" in html
    row = r"<tr><td>nucleus_area</td><td>\+</td><td>[^<]*</td><td>-?\d\.\d{3}</td><td>[-.\d]*</td>"
    assert re.search(row, html)


def test_missing_sections_are_left_out(hostile_run: Path) -> None:
    html = (hostile_run / "report.html").read_text(encoding="utf-8")
    assert '<section id="classifier">' in html
    assert 'id="autoencoder"' not in html and 'id="directions"' not in html
    assert 'id="evaluation"' not in html  # no evaluation.json in this run


def test_user_text_is_escaped(hostile_run: Path) -> None:
    html = (hostile_run / "report.html").read_text(encoding="utf-8")
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "control &amp; co" in html


def test_report_without_results_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    assert "no DiffEx results" in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems, dialogs


def test_browser_loads_without_errors_and_slider_works(browser, demo_run: Path) -> None:
    page, problems, _ = open_page(browser, demo_run / "report.html")
    broken = page.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
    )
    assert broken == 0
    box = page.locator(".sweep").first
    slider, img, readout = (
        box.locator("input[type=range]"),
        box.locator("img.frame"),
        box.locator(".readout"),
    )
    start_src, start_text = img.get_attribute("src"), readout.inner_text()
    assert "alpha = +0.00" in start_text or "alpha = 0.00" in start_text
    slider.focus()
    page.keyboard.press("End")  # the browser moves the slider and fires 'input'
    end_src, end_text = img.get_attribute("src"), readout.inner_text()
    assert end_src != start_src
    assert end_text != start_text and "alpha = +" in end_text
    data = json.loads(box.locator(".sweep-data").text_content())
    last = len(data["frames"]) - 1
    assert end_src == data["frames"][last] and start_src == data["frames"][last // 2]
    shown = [
        float(v) for v in re.findall(r"\d\.\d\d", end_text.split("per cell:")[1].split("mean")[0])
    ]
    want = data["p"][last]  # that frame's probabilities, two decimals
    assert len(shown) == len(want) > 0 and all(
        abs(a - b) < 0.006 for a, b in zip(shown, want, strict=True)
    )
    assert f"alpha = +{data['alphas'][last]:.2f}" in end_text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report_quick_demo.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    assert problems == [], problems
    page.close()


def test_browser_hostile_class_name_runs_nothing(browser, hostile_run: Path) -> None:
    page, problems, dialogs = open_page(browser, hostile_run / "report.html")
    assert dialogs == []
    assert HOSTILE in page.inner_text("body")
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # only the report's own
    assert problems == [], problems
    page.close()


def _drop(obj: object, keys: set[str]) -> object:
    """A copy of a JSON value without ``keys`` at any depth."""
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def test_runs_evaluated_before_schema_2_still_report_and_compare(
    demo_run: Path, tmp_path: Path
) -> None:
    """A run explained and evaluated before the forward leakage existed (schema_version 1: no
    rho_forward, leakage_forward or worst_leak_forward) still builds its report and its
    comparison numbers, with the missing values empty rather than an error."""
    from diffex.evaluate.run import method_summary

    run = tmp_path / "old"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "cache"))
    new_keys = {
        "rho_forward",
        "leakage_forward",
        "worst_leak_forward",
        "frame_checks",  # schema 3
        "frame_flags",
        "imaging_drift",  # schema 4
        "past_data",
    }
    for path in [run / "evaluation.json", *run.glob("explanations/**/summary.json")]:
        doc = _drop(json.loads(path.read_text(encoding="utf-8")), new_keys)
        if path.name == "evaluation.json":
            assert isinstance(doc, dict)
            doc["schema_version"] = 1
        path.write_text(json.dumps(doc), encoding="utf-8")
    old = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    assert "leakage_forward" not in json.dumps(old)
    summary = method_summary(old)
    assert (
        summary["leakage_forward"] is None and summary["leakage"] == old["ground_truth"]["leakage"]
    )
    (run / "report.html").unlink()
    build_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    assert '<section id="evaluation">' in html and '<section id="directions">' in html


def test_flagged_frames_are_named_under_their_sweep(demo_run: Path, tmp_path: Path) -> None:
    """Frames of a sweep that the artifact guard flags are named in the report, with the
    warning, under that direction's slider; unflagged sweeps carry no such warning."""
    run = tmp_path / "flagged"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "cache"))
    path = run / "explanations" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    checks = summary["items"][0]["frame_checks"]
    assert len(checks) == len(summary["items"][0]["alphas"])
    for c in checks:
        c["flags"] = []
    checks[0]["flags"] = ["stain gain -8.6 sd"]
    path.write_text(json.dumps(summary), encoding="utf-8")
    (run / "report.html").unlink()
    build_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    line = f"alpha {checks[0]['alpha']:+.3g}: stain gain -8.6 sd"
    assert html.count("The artifact guard flags frames of this sweep") == 1
    assert f"The artifact guard flags frames of this sweep: {line}." in html


def test_frames_past_the_data_are_named_under_their_sweep(demo_run: Path, tmp_path: Path) -> None:
    """Frames where most edited cells are past the training data are named in the report under
    that direction, with their share of cells; sweeps without such frames carry no line."""
    run = tmp_path / "past"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "cache"))
    path = run / "explanations" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    for i, item in enumerate(summary["items"]):
        for j, c in enumerate(item["frame_checks"]):
            c["past_data"] = 0.9 if (i, j) == (0, 0) else 0.1
    path.write_text(json.dumps(summary), encoding="utf-8")
    (run / "report.html").unlink()
    build_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    alpha = summary["items"][0]["frame_checks"][0]["alpha"]
    assert html.count("Frames past the training data") == 1
    assert f"Frames past the training data: alpha {alpha:+.3g} (90 % of cells)." in html


def test_imaging_drift_is_named_under_its_sweep(demo_run: Path, tmp_path: Path) -> None:
    """An imaging measurement that follows alpha along a sweep (here the DNA stain's gain,
    rho 0.36) is named in the report under that direction; sweeps without one carry no such
    warning."""
    from diffex.data.measure import IMAGING_MEASUREMENTS

    run = tmp_path / "drift"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "cache"))
    path = run / "explanations" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    assert summary["items"] and all(item.get("morphology") for item in summary["items"])
    for i, item in enumerate(summary["items"]):
        for row in item["morphology"]:
            if row["feature"] in IMAGING_MEASUREMENTS:
                drifts = i == 0 and row["feature"] == "brightness"
                row["rho_alpha"], row["rho_forward"] = (0.36, -0.11) if drifts else (0.05, 0.0)
    path.write_text(json.dumps(summary), encoding="utf-8")
    (run / "report.html").unlink()
    build_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count("Imaging measurements follow alpha along this sweep") == 1
    assert "follow alpha along this sweep: brightness rho +0.36 (towards the target -0.11)" in html


def test_largest_changes_are_the_largest_shown_changes() -> None:
    """The table's "largest changes" are ordered by the shown change itself (alpha 0 to the
    shown alpha, in natural sds), not by how consistently a feature moves over the whole sweep:
    a tiny change with a high rho over the far side of the sweep must not be listed first."""
    from diffex.report.html import _top_changes

    morphology = [
        {"feature": "brightness", "pct_change": 0.7, "change_sd": 0.07, "rho_alpha": 0.39},
        {"feature": "nucleus_area", "pct_change": 29.0, "change_sd": 1.77, "rho_alpha": 0.81},
        {"feature": "actin_intensity", "pct_change": -31.0, "change_sd": -1.57, "rho_alpha": -0.1},
        {"feature": "cell_area", "pct_change": -6.0, "change_sd": -0.47, "rho_alpha": -0.17},
        {"feature": "offset_x", "pct_change": float("nan"), "change_sd": -2.0, "rho_alpha": 0.9},
    ]
    assert _top_changes({"morphology": morphology}) == (
        "nucleus_area +29 %, actin_intensity -31 %, cell_area -6 %"
    )


def test_restarts_line_says_which_set_and_how_sure() -> None:
    from diffex.report.html import _restarts_line

    assert _restarts_line({"n": 1, "k": 10, "chosen": 0}) == ""
    sets = {"n": 2, "k": 10, "chosen": 1, "best_mean_delta_p": [0.851, 0.865]}
    plain = _restarts_line(sets)  # a ranking.json from before margins
    assert "restart 1" in plain and "+0.851, +0.865" in plain and "close" not in plain
    sure = _restarts_line({**sets, "runner_up": 0, "margin": 0.103, "margin_se": 0.015})
    assert "+0.103 ± 0.015" in sure and "close call" not in sure
    close = {**sets, "runner_up": 0, "margin": 0.013, "margin_se": 0.008, "close": True}
    assert "a close call" in _restarts_line(close)
