"""A traced run's files end to end: trace files per variant read back, the summary in results.json,
and TensorBoard's PyTorch Profiler tab listing every variant, checked in headless Chromium.

The browser part needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); where they
are absent it skips and says so. Every process it starts is stopped in a `finally`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from bench.run import main

VARIANTS = ("unfreeze-1", "unfreeze-3")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Chromium as the machine's probe starts it: no sandbox as root, no GPU, and no background traffic
# (this network refuses it, many connections at a time).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1400,900")


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("traced") / "run"
    code = main(["--profile", "smoke", "--device", "cpu", "--unfreeze", ",".join(v.split("-")[1] for v in VARIANTS), "--trace",
                 "--train-size", "256", "--val-size", "128", "--batch-size", "32", "--epochs", "1",
                 "--warmup-steps", "2", "--trace-steps", "2", "--loader", "torch", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.slow
def test_every_variant_leaves_a_trace_that_is_read_back(traced_run):
    doc = json.loads((traced_run / "results.json").read_text())
    for row in doc["rows"]:
        files = list((traced_run / "traces" / row["variant"]).glob("rank0.*.pt.trace.json.gz"))
        assert len(files) == 1 and 0 < files[0].stat().st_size < 20 * 2**20
        summary = row["trace"]
        assert summary["file"] == str(files[0]) and summary["steps"] == 2
        assert summary["top"] and all(op["name"] and op["total_ms"] > 0 for op in summary["top"])
        assert any("convolution" in op["name"] for op in summary["top"])
        assert 0 <= summary["idle_pct"] < 100
        # 8 steps ran: 2 warm-up, the profiler's warm-up, 2 recorded, 3 more (that the traced ones are
        # left out of images/s is test_trace.py's test_traced_steps_are_left_out_of_the_throughput_figures)
        assert row["steps"] == 8 and row["images_per_s"] > 0


@pytest.mark.slow
def test_report_links_the_table_plots_traces_and_evaluation(traced_run):
    report = (traced_run / "report.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in report
    for link in ("plots/curves.png", "traces/unfreeze-1/rank0.", "table.txt", "classification_report.csv"):
        assert link in report
    assert "img/s" in (traced_run / "table.txt").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for_runs(base: str, expected: set[str], tensorboard: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    """The profiler plugin's runs endpoint, polled until it lists every run (it loads them in the background)."""
    deadline = time.monotonic() + timeout
    runs: list[str] = []
    while time.monotonic() < deadline:
        assert tensorboard.poll() is None, f"tensorboard exited with {tensorboard.returncode}"
        try:
            answer = get_json(f"{base}/data/plugin/pytorch_profiler/runs")
            runs = answer["runs"]
            if expected <= set(runs) and not answer.get("loading"):
                return runs
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"the profiler plugin listed {runs} after {timeout:.0f} s, expected {sorted(expected)}")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_profiler_tab_lists_every_variant_in_headless_chromium(traced_run, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tensorboard = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(traced_run / "traces"),
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = None
    try:
        assert set(wait_for_runs(base, set(VARIANTS), tensorboard)) == set(VARIANTS)
        # each run has its worker and a step-time overview behind it
        for run in VARIANTS:
            assert get_json(f"{base}/data/plugin/pytorch_profiler/workers?run={run}&view=Overview") == ["rank0"]

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
            options.add_argument(flag)
        # the system chromedriver, so selenium never tries to download one
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        driver.get(f"{base}/#pytorch_profiler")
        wait = WebDriverWait(driver, 60)
        # The plugin renders in an iframe. Its side panel (runs, views, workers) is all that renders
        # offline: the views' charts load Google Charts from www.gstatic.com, which this network refuses.
        wait.until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        selects = "[role=button][aria-haspopup=listbox]"  # Material-UI drop-downs: runs, views, workers
        wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, selects)][:3] ==
                   [VARIANTS[0], "Overview", "rank0"])
        screenshot = tmp_path / "profiler.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("PROFILER_SCREENSHOT"):  # how docs/ gets its picture
            shutil.copy(screenshot, os.environ["PROFILER_SCREENSHOT"])
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # opening the Runs drop-down lists every variant
        driver.find_elements(By.CSS_SELECTOR, selects)[0].click()
        def listed(d) -> list[str] | None:  # the menu's items once its opening animation has shown them
            texts = [li.text for li in d.find_elements(By.CSS_SELECTOR, "li[role=option]")]
            return texts if texts and all(texts) else None
        assert wait.until(listed) == sorted(VARIANTS)
    finally:
        if driver is not None:
            driver.quit()
        tensorboard.terminate()
        try:
            tensorboard.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tensorboard.kill()
            tensorboard.wait()
