"""The HTML run report: content of the page, and the page in a real headless browser (Debian's chromium)."""

import os
import re
import shutil
import struct

import pytest

from conftest import copy_run
from lamina.errors import DataError
from lamina.report.html import build_report


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_run):
    # the shared digits run (conftest), copied under a name the page must escape: calibrate and gradients write into it
    run_dir = copy_run(digits_run, tmp_path_factory.mktemp("runs") / "report-<run>")
    from lamina.trust.calibration import calibrate_run
    from lamina.trust.gradients import gradient_health_run

    calibrate_run(run_dir)
    gradient_health_run(run_dir)
    return run_dir


def test_report_is_self_contained_and_shows_each_computed_part(run):
    path = build_report(run)
    page = path.read_text()
    assert path == run / "report.html" and page.startswith("<!DOCTYPE html>")
    for sid in ("overview", "curves", "overfitting", "confusion", "calibration", "gradients", "config"):
        assert f'<section id="{sid}">' in page, sid
    for sid in ("robustness", "fairness", "learning-curve"):  # not computed for this run: no empty sections
        assert f'<section id="{sid}">' not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing external
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "report-&lt;run&gt;" in page  # the run name (from the config) is escaped, not injected
    acc = re.search(r"<b>([0-9.]+)</b><span>acc</span>", page)
    import json

    assert float(acc.group(1)) == pytest.approx(json.loads((run / "summary.json").read_text())["test"]["test/acc"],
                                                abs=1e-4)
    assert "ECE" in page.upper() and "temperature" in page


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        build_report(tmp_path)


def _browser():
    """(chromium, chromedriver) or a skip; LAMINA_REQUIRE_BROWSER=1 (CI) turns the skip into a failure."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if not (chromium and driver):
        if os.environ.get("LAMINA_REQUIRE_BROWSER") == "1":
            pytest.fail("headless browser test required but chromium, chromedriver or selenium is missing")
        pytest.skip("needs chromium + chromedriver (apt install chromium chromium-driver) and selenium")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,2000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()


def _load(browser, path):
    browser.get(path.resolve().as_uri())
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
    return browser.get_log("browser"), broken, browser.execute_script("return document.images.length")


def test_the_detector_sees_console_errors_and_broken_images(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><img src='missing.png'>"
                   "<script>console.error('boom')</script></body></html>")
    logs, broken, n = _load(browser, bad)
    assert broken == 1 and n == 1
    assert any("boom" in e["message"] for e in logs) and any("missing.png" in e["message"] for e in logs), logs


def test_report_opens_in_headless_chromium_without_console_errors(browser, run, tmp_path):
    path = build_report(run)
    logs, broken, n = _load(browser, path)
    assert logs == [] and broken == 0 and n >= 3, (logs, broken, n)
    assert browser.title == f"lamina report: {run.name}"
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    head = shot.read_bytes()[:24]
    w, h = struct.unpack(">II", head[16:24])  # PNG IHDR: the screenshot is a real rendered page
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and (w, h) == (1200, browser.execute_script("return window.innerHeight"))
    assert shot.stat().st_size > 20_000
