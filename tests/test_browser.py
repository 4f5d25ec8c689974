"""Each kind of report.html (run, sweep, comparison) in a real headless Chromium (Debian's chromium
and chromium-driver, which .ci/run installs): the page loads with no console error, its table holds
the JSON's rows, sorting by a column works both ways, and it fits a phone-width screen. A screenshot
of each is left beside the report (report_screenshot.png) for people to look at."""

import json
import os
import shutil

import pytest
from conftest import make_cfg, tiny_overrides

from outlier_hydra.pipeline import run
from outlier_hydra.tools.compare import compare
from outlier_hydra.tools.sweep_summary import write_summary

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
    pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _column(browser, table_id, index):
    from selenium.webdriver.common.by import By

    return [
        row.find_elements(By.TAG_NAME, "td")[index].text
        for row in browser.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    ]


def _check(browser, page, table_id, first_column, sort_by, numeric=True):
    """Loads with no console message, holds the rows, sorts both ways, fits 390 px; screenshot."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(1280, 1000)
    browser.get(page.resolve().as_uri())
    assert browser.get_log("browser") == [], "console messages"
    assert _column(browser, table_id, 0) == [str(v) for v in first_column]
    headers = [th.text.strip() for th in browser.find_elements(By.CSS_SELECTOR, f"#{table_id} th")]
    col = headers.index(sort_by)
    header = browser.find_elements(By.CSS_SELECTOR, f"#{table_id} th")[col]
    key = float if numeric else str
    header.click()
    values = [key(v) for v in _column(browser, table_id, col)]
    assert values == sorted(values)
    header.click()
    values = [key(v) for v in _column(browser, table_id, col)]
    assert values == sorted(values, reverse=True)
    assert browser.get_log("browser") == [], "console messages after sorting"
    browser.save_screenshot(str(page.parent / "report_screenshot.png"))
    browser.set_window_size(390, 844)
    width, viewport = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= viewport, "the page is wider than a phone"


@pytest.fixture(scope="module")
def two_runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for i, (family, threshold) in enumerate((("olmoe", 6), ("mixtral", 4))):
        d = root / "sweep" / str(i)
        run(make_cfg(*tiny_overrides(tiny_models[family], f"analysis.magnitude_threshold={threshold}")), d)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- analysis.magnitude_threshold={threshold}\n")
        out[family] = d
    return root, out


def test_run_report_in_a_browser(browser, two_runs):
    _, runs = two_runs
    page = runs["olmoe"] / "report.html"
    results = json.loads((runs["olmoe"] / "final_analysis_results.json").read_text())
    assert len(results["systematic_outliers"]) >= 2
    _check(browser, page, "features", [f["feature_dim"] for f in results["systematic_outliers"]], "max_magnitude")
    assert (runs["olmoe"] / "report_screenshot.png").stat().st_size > 10_000


def test_sweep_report_in_a_browser(browser, two_runs):
    root, _ = two_runs
    rows = write_summary(root / "sweep")
    _check(browser, root / "sweep" / "report.html", "jobs", [r["job"] for r in rows], "num_systematic_outliers")


def test_comparison_report_in_a_browser(browser, two_runs, tmp_path):
    _, runs = two_runs
    doc = compare(list(runs.values()), tmp_path / "cmp", reanalyze=True)
    shown = ["/".join(r["run"].rstrip("/").split("/")[-2:]) for r in doc["runs"]]
    _check(browser, tmp_path / "cmp" / "report.html", "runs", shown, "mean_seq_pct")
