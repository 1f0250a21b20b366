"""``report.html`` opened in a real headless browser (Debian's ``chromium``): tables render and every image loads.

The page is a copy of a real compile report with one script appended that, on load, writes each image's
``naturalWidth`` and each table's row count into ``<body data-...>``; ``--dump-dom`` then shows what the browser
built. A screenshot must not be blank. Without chromium the test skips saying so (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1);
  const tables = Array.from(document.querySelectorAll("table")).map(t => t.id + ":" + t.rows.length);
  document.body.setAttribute("data-img-widths", imgs.join(","));
  document.body.setAttribute("data-tables", tables.join(","));
});
</script>
</body>"""


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def _browse(browser: str, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=10000", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    run = [sys.executable, "-m", "qir"]
    assert subprocess.run([*run, "demo", "-q", "-o", str(tmp / "demo")], capture_output=True).returncode == 0
    proc = subprocess.run([*run, "compile", str(tmp / "demo" / "tiny-f32.qir"), "--preset", "w4a16",
                           "-o", str(tmp / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_report_renders_tables_and_images_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is missing: apt-get install -y --no-install-recommends chromium (.ci/run does)")
    html = (report_dir / "report.html").read_text()
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", PROBE, 1))
    dom = _browse(browser, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = re.search(r'data-img-widths="([^"]*)"', dom.stdout)
    assert widths is not None, dom.stdout[:2000]
    sizes = [int(w) for w in widths.group(1).split(",")]
    assert len(sizes) == 3 and all(w > 100 for w in sizes), sizes  # each plot decoded to a real bitmap
    tables = dict(t.split(":") for t in re.search(r'data-tables="([^"]*)"', dom.stdout).group(1).split(","))
    layers = json.loads((report_dir / "report.json").read_text())["layers"]
    assert int(tables["layers"]) == len(layers) + 1 and int(tables["totals"]) >= 4

    shot = tmp_path / "shot.png"
    proc = _browse(browser, report_dir / "report.html", f"--screenshot={shot}", "--window-size=1000,1400")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 900
    # not blank: many distinct colours (text, the plots' blue/orange bars), not one background colour
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, len(colours)
