"""report.html in every run folder, `tunewright report` and `tunewright compare`, and the page in a real browser."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import train_tiny_run
from typer.testing import CliRunner

from tunewright import report as report_module
from tunewright.cli import app
from tunewright.compare import flatten
from tunewright.report import marked_difference, write_report
from tunewright.report_data import reliability_bins
from tunewright.run import check_complete, read_status

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path(tempfile.gettempdir()) / "tunewright-report-screenshot.png"
HALVES = {"preprocessing": {"split": [0.5, 0.5, 0.0]}}  # a validation split, so there are metrics and predictions


@pytest.fixture(scope="module")
def text_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "text-run"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 4, "eval_every": 2, "precision": "fp32"},
                          rows_repeat=4, **HALVES)


@pytest.fixture(scope="module")
def category_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "category-run"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 2, "precision": "fp32"}, rows_repeat=4,
                          output_features=[{"name": "echo", "type": "category"}], **HALVES)


@pytest.fixture
def copied_run(text_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(text_run, tmp_path / "copy"))


def page_of(run: Path) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


def test_every_completed_run_has_a_self_contained_report(text_run: Path) -> None:
    page = page_of(text_run)
    assert page.count("<svg") == 3  # loss (training + validation), learning rate, tokens/s
    for shown in ("Training curves", "Metrics", "exact_match", "Predictions", "Timings", "Machine",
                  "learning_rate:", "device"):
        assert shown in page, shown
    # Nothing is fetched: no script, stylesheet, font or remote image, and a policy that forbids them.
    assert not re.search(r"<script|<link|<iframe|@import|url\((?!#)|src=\"?https?:", page, re.IGNORECASE)
    assert "default-src 'none'" in page
    assert read_status(text_run)["hardware"]["device"] == "cpu"
    assert (text_run / "predictions_validation.jsonl").is_file()
    check_complete(text_run)  # the report and predictions are outside the checksums: loading still works


def test_text_outputs_show_predictions_beside_targets_with_the_differences_marked() -> None:
    assert marked_difference("SELECT a FROM t", "SELECT b FROM t") == (
        "SELECT <del>a</del> FROM t", "SELECT <ins>b</ins> FROM t")
    assert marked_difference("<b>", "<i>") == ("&lt;<del>b</del>&gt;", "&lt;<ins>i</ins>&gt;")
    assert marked_difference("same", "same") == ("same", "same")


def test_category_outputs_show_the_confusion_matrix_and_a_reliability_diagram(category_run: Path) -> None:
    page = page_of(category_run)
    assert "Confusion matrix (validation)" in page and "Reliability (validation)" in page
    assert "expected calibration error" in page and "Predictions" not in page


def test_reliability_bins_put_each_prediction_in_its_probability_bin() -> None:
    rows = [{"prediction": "a", "label": "a", "prediction_probability": 0.95},
            {"prediction": "a", "label": "b", "prediction_probability": 0.91},
            {"prediction": "b", "label": "b", "prediction_probability": 0.42},
            {"prediction": "b", "label": "b", "prediction_probability": 1.0},
            {"prediction": "b", "label": "b", "prediction_probability": None}]
    bins = reliability_bins(rows, "label")
    assert [(b.low, b.rows, b.accuracy) for b in bins] == [(0.4, 1, 1.0), (0.9, 3, 2 / 3)]
    assert bins[1].confidence == pytest.approx((0.95 + 0.91 + 1.0) / 3)


def test_a_zero_shot_run_without_a_training_log_still_gets_a_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = train_tiny_run(tiny_model_dir, tmp_path / "zero", {"type": "none"}, rows_repeat=2, **HALVES)
    page = page_of(run)
    assert "No training log" in page and "none (zero-shot)" in page and "exact_match" in page


def test_everything_from_the_data_is_escaped(copied_run: Path) -> None:
    hostile = {"word": "<script>alert(1)</script>", "echo": "</td></table><b>bold",
               "prediction": "<img src=x onerror=alert(2)>"}
    (copied_run / "predictions_validation.jsonl").write_text(json.dumps(hostile) + "\n", encoding="utf-8")
    config = (copied_run / "config.yaml").read_text(encoding="utf-8")
    (copied_run / "config.yaml").write_text(config + "# </pre><script>alert(3)</script>\n", encoding="utf-8")
    page = page_of(write_report(copied_run).parent)
    assert "<script" not in page and "<img" not in page and "</td></table><b>" not in page
    assert html.escape("<script>alert(1)</script>") in page and "&lt;/pre&gt;&lt;script&gt;" in page


def test_without_matplotlib_the_page_has_tables_and_says_how_to_get_plots(
    copied_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_module, "plots_available", lambda: False)
    page = page_of(write_report(copied_run).parent)
    assert "<svg" not in page and "pip install &#x27;tunewright[plot]&#x27;" in page and "exact_match" in page


def test_report_regenerates_the_page_and_names_a_bad_folder(copied_run: Path, tmp_path: Path) -> None:
    (copied_run / "report.html").unlink()
    result = runner.invoke(app, ["report", str(copied_run)])
    assert result.exit_code == 0, result.output
    assert (copied_run / "report.html").is_file() and result.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 5 and f"{empty}: not a tunewright run folder" in result.stderr
    status = json.loads((copied_run / "run.json").read_text())
    (copied_run / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))
    result = runner.invoke(app, ["report", str(copied_run)])
    assert result.exit_code == 5 and f"{copied_run}: the run is interrupted, not complete" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compare_writes_one_page_with_configs_diffed_and_curves_overlaid(
    text_run: Path, category_run: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "pages" / "compare.html"
    result = runner.invoke(app, ["compare", str(text_run), str(category_run), "--output", str(page_path)])
    assert result.exit_code == 0, result.output
    page = page_path.read_text(encoding="utf-8")
    assert "<code>output_features.0.type</code>" in page and "<code>trainer.max_steps</code>" in page
    assert "text-run · validation" in page and "category-run · validation" in page
    assert page.count("<svg") == 3 and "text-run: training loss" in page and "category-run: training loss" in page


def test_compare_refuses_bad_input_in_one_line(text_run: Path, tmp_path: Path) -> None:
    page = str(tmp_path / "c.html")
    alone = runner.invoke(app, ["compare", str(text_run), "--output", page])
    assert alone.exit_code == 2 and "two or more run folders" in alone.output
    wrong_type = runner.invoke(app, ["compare", str(text_run), str(text_run), "--output", str(tmp_path / "c.txt")])
    assert wrong_type.exit_code == 2 and ".html" in wrong_type.output
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["compare", str(text_run), str(missing), "--output", page])
    assert result.exit_code == 5 and result.stderr.strip() == f"error: {missing}: run folder not found"


def test_flatten_names_every_setting_by_its_key_path() -> None:
    config = {"trainer": {"lr": 0.1, "split": [0.8, 0.2]}, "output_features": [{"name": "y"}], "adapter": None}
    assert flatten(config) == {"trainer.lr": 0.1, "trainer.split": [0.8, 0.2], "output_features.0.name": "y",
                               "adapter": None}


def test_a_report_that_fails_never_fails_the_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(run: object) -> str:
        raise RuntimeError("the plot library is broken")

    monkeypatch.setattr(report_module, "render_report", broken)
    with caplog.at_level(logging.WARNING, logger="tunewright.report"):
        run = train_tiny_run(tiny_model_dir, tmp_path / "run", {"max_steps": 1, "precision": "fp32"})
    assert read_status(run)["status"] == "complete" and not (run / "report.html").exists()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"{run}: report.html not written (the plot library is broken); run `tunewright report "
                        f"{run}` to retry"]


def test_writing_a_report_is_fast(text_run: Path) -> None:
    write_report(text_run)  # matplotlib's first import is not what this measures
    started = time.perf_counter()
    write_report(text_run)
    assert time.perf_counter() - started < 2.0


# The browser: Debian's chromium, which `make install` / `make test` install wherever apt-get exists.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
# Added to a copy of the page: measures each plot as laid out and drawn (the report itself has no script).
PROBE = """<img src="https://cdn.example.invalid/x.png"><script>
document.body.dataset.probe = JSON.stringify([...document.querySelectorAll("figure svg")].map(svg => {
  const box = svg.getBoundingClientRect();
  const drawn = [...svg.querySelectorAll("path")].filter(p => { const b = p.getBBox(); return b.width || b.height; });
  return {width: box.width, height: box.height, drawn: drawn.length};
}));
</script>"""


def chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.skip("no /usr/bin/chromium and no apt-get to install it: the browser check needs Debian's chromium")
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (it installs Debian's chromium) or "
                    "`apt-get install -y chromium`")
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    return subprocess.run([str(CHROMIUM), *BROWSER_FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=60, check=True)


def console_messages(stderr: str) -> list[str]:
    return [line.split("] ", 1)[-1] for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_renders_in_headless_chromium(category_run: Path, text_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    for run in (text_run, category_run):
        loaded = chromium(tmp_path, "--dump-dom", (run / "report.html").as_uri())
        assert console_messages(loaded.stderr) == [] and "Timings and hardware" in loaded.stdout
    # A copy with a probe script (allowed by the copy's policy) and a remote image the policy must refuse.
    probed = tmp_path / "probed.html"
    page = page_of(category_run).replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed.write_text(page.replace("</main>", PROBE + "</main>"), encoding="utf-8")
    result = chromium(tmp_path, "--dump-dom", probed.as_uri())
    messages = console_messages(result.stderr)
    assert len(messages) == 1 and "violates the following Content Security Policy" in messages[0]
    plots = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', result.stdout).group(1)))
    assert len(plots) == 5  # 3 curves, and the validation split's confusion matrix and reliability diagram
    assert all(plot["width"] > 200 and plot["height"] > 150 and plot["drawn"] > 5 for plot in plots), plots
    screenshot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000", (text_run / "report.html").as_uri())
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000) and len(image.convert("L").getcolors(65536) or []) > 50
    shutil.copyfile(screenshot, SCREENSHOT_COPY)  # to look at: tests keep it in tmp_path too


def test_the_overview_names_the_kept_step_when_a_metric_chose_it(tmp_path: Path) -> None:
    training = {"type": "finetune", "steps": 60, "eval_metric": "exact_match", "best_eval_metric": 0.32,
                "best_step": 40}
    run = report_module.RunRecord(tmp_path, "", {}, {}, {"training": training})
    page = report_module.overview(run)
    assert "kept: best exact_match" in page and ">40<" in page.replace(" ", "")
    training["eval_metric"] = "loss"
    assert "kept step" not in report_module.overview(run)
