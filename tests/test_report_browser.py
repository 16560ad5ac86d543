"""The HTML report in a real headless browser (Chromium): it opens offline from its one file, and its first
screen (1300 x 2000) holds the lead figure, drawn, and the summary table, with the details folded below.

Needs `chromium` (Debian: `apt-get install -y chromium`; scripts/test.sh installs it as root). Without it the
test skips with the reason, except under CI=true, where it fails.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest_slurm import in_ci
from fixtures.synthetic_runs import add_partial_arm, standard_experiment
from PIL import Image

from harness.report import write_report

WIDTH, HEIGHT = 1300, 2000
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# measures the page once everything (the base64 images included) has loaded; --dump-dom prints the result
PROBE = """<script>window.addEventListener('load', function () {
  function box(id) { var r = document.getElementById(id).getBoundingClientRect();
                     return {top: r.top, bottom: r.bottom, height: r.height}; }
  var img = document.getElementById('lead-figure');
  document.body.setAttribute('data-layout', JSON.stringify({figure: box('lead-figure'), summary: box('summary'),
    details: box('details'), open: document.getElementById('details').open, decoded: img.naturalWidth}));
});</script></body>"""


@pytest.fixture(scope="module")
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if in_ci():
        pytest.fail("CI=true but no Chromium on PATH: scripts/test.sh installs it as root (apt-get install chromium)")
    pytest.skip("no Chromium on PATH (`apt-get install -y chromium`, as scripts/test.sh does as root): the report "
                "is not checked in a real browser")


def run_browser(browser: str, tmp_path: Path, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},{HEIGHT}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    exp = standard_experiment(root)
    add_partial_arm(exp)  # three arms, one running: the summary table is as tall as it gets in practice
    [html] = write_report(exp.dir, show=False)
    return html


def test_the_first_screen_holds_the_figure_and_the_summary_table(browser, report_html, tmp_path):
    probe = tmp_path / "probe.html"  # the report as written, with a script that measures it
    probe.write_text(report_html.read_text().replace("</body>", PROBE))
    dom = run_browser(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    attribute = dom.split('data-layout="', 1)[1].split('"', 1)[0].replace("&quot;", '"')
    layout = json.loads(attribute)
    assert layout["decoded"] > 500  # the embedded PNG decoded: the page needs nothing but its own file
    figure, summary, details = layout["figure"], layout["summary"], layout["details"]
    assert figure["height"] > 300 and summary["height"] > 50
    assert figure["bottom"] <= summary["top"] and summary["bottom"] <= HEIGHT  # both on the first screen
    assert details["top"] > summary["bottom"] and layout["open"] is False  # the per-budget tables: folded, after


def test_screenshot_shows_the_report(browser, report_html, tmp_path):
    shot = tmp_path / "report.png"
    run_browser(browser, tmp_path, f"--screenshot={shot}", report_html.as_uri())
    with Image.open(shot) as image:
        assert image.size == (WIDTH, HEIGHT)
        top = np.asarray(image.convert("RGB").crop((0, 0, WIDTH, HEIGHT // 2))).reshape(-1, 3).astype(int)
    inked = (top != 255).any(axis=1).mean()
    assert inked > 0.03  # text, table lines and the figure, not a blank or error page
    # matplotlib's first two colours (the arms' curves) are on screen: the figure itself was drawn
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(top - colour) <= 12).all(axis=1).any(), colour
