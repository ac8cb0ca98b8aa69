"""The report in a real browser: headless Chromium loads index.html from a file:// URL, renders it and
runs a probe that records in the DOM what rendered (image sizes, broken images, table rows, sorting)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from test_report import make_analysis, model_dir, write_inputs  # noqa: F401 (model_dir is a fixture)

from acttail.report import build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1366,900"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")

# Runs after load; writes what it found as data-* attributes on <html>, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(e.message); });
window.addEventListener("load", function () {
  var r = document.documentElement, imgs = Array.prototype.slice.call(document.images);
  r.dataset.images = imgs.length;
  r.dataset.broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  r.dataset.minNatural = Math.min.apply(null, imgs.map(function (i) {
    return Math.min(i.naturalWidth, i.naturalHeight);
  }));
  r.dataset.minShown = Math.min.apply(null, imgs.map(function (i) { return i.getBoundingClientRect().width; }));
  r.dataset.pageWidth = document.documentElement.scrollWidth;
  var rows = function () { return document.querySelectorAll("#projections tbody tr"); };
  r.dataset.rows = rows().length;
  var th = Array.prototype.filter.call(document.querySelectorAll("#projections thead th"),
                                       function (h) { return h.textContent === "alpha"; })[0];
  th.click(); th.click();  // descending alpha
  var col = th.cellIndex, first = rows()[0].cells[col].dataset.v, last = rows()[rows().length - 1].cells[col].dataset.v;
  var values = Array.prototype.map.call(rows(), function (tr) { return tr.cells[col].dataset.v; })
                    .filter(function (v) { return v !== ""; }).map(Number);
  r.dataset.sortedDesc = values.every(function (v, k) { return k === 0 || values[k - 1] >= v; });
  r.dataset.nullsLast = last === "" || values.length === rows().length;
  r.dataset.firstAlpha = first;
  r.dataset.errors = window.__errors.join(" | ");
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)


def probe(index: Path, tmp: Path) -> dict:
    """Load a copy of the page with PROBE injected; return the data-* attributes it set on <html>."""
    page = tmp / "probe.html"
    page.write_text(index.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = chromium(["--dump-dom", page.as_uri()], tmp / "profile-dom").stdout
    head = re.search(r"<html[^>]*>", dom)
    assert head, f"chromium printed no DOM: {dom[:300]!r}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', head.group(0)))


def test_report_renders_in_chromium(tmp_path, model_dir):
    paths = write_inputs(tmp_path / "in", make_analysis(model_dir))
    index = build_report(paths["analysis"], paths["plans"], paths["evals"], tmp_path / "report")
    n_figures = len(list((tmp_path / "report" / "figures").glob("*.png")))

    found = probe(index, tmp_path)
    assert found["errors"] == "", found["errors"]
    assert int(found["images"]) == n_figures >= 8
    assert found["broken"] == "0"
    assert int(found["min-natural"]) > 100 and float(found["min-shown"]) > 300
    assert int(found["page-width"]) <= 1366  # no horizontal scrolling on a laptop screen
    assert found["rows"] == "21"
    assert found["sorted-desc"] == "true" and found["nulls-last"] == "true"
    alphas = [r["alpha"] for r in json.loads(paths["analysis"].read_text())["projections"]]
    assert float(found["first-alpha"]) == pytest.approx(max(a for a in alphas if a is not None))

    shot = Path(os.environ.get("ACTTAIL_SCREENSHOT_DIR", tmp_path)) / "report-screenshot.png"
    result = chromium([f"--screenshot={shot}", index.as_uri()], tmp_path / "profile-shot")
    assert shot.is_file(), result.stderr[-500:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (900, 1366)
    assert np.std(pixels[..., :3]) > 0.05  # not a blank page
