"""Open a finetune report.html in headless Chromium: check that every image decoded, and save a
full-page screenshot to look at.

    python bench/check_report_html.py runs/compare/x/report/report.html --screenshot shot.png

Chromium reports each <img>'s natural size after load through a small script injected into a
temporary copy of the page (the report itself carries no script). Exit 1 if any image is
missing, broken or empty.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(i => [i.alt, i.complete, i.naturalWidth,
                                                 i.naturalHeight]);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def run(page: Path, *args: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", "--virtual-time-budget=5000", *args,
           page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def image_states(report: Path) -> list[list]:
    """[alt, complete, naturalWidth, naturalHeight] for every image, as Chromium loaded it."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        dom = run(probe, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    if not found:
        raise SystemExit("the page did not finish loading in Chromium")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=9000)
    ns = parser.parse_args()
    states = image_states(ns.report)
    bad = [s for s in states if not s[1] or s[2] == 0 or s[3] == 0]
    for alt, complete, w, h in states:
        print(f"{'ok ' if complete and w and h else 'BAD'} {w:>5}x{h:<5} {alt}")
    print(f"{len(states) - len(bad)} of {len(states)} images shown")
    if ns.screenshot:
        run(ns.report, f"--screenshot={ns.screenshot.resolve()}",
            f"--window-size={ns.width},{ns.height}")
        print(f"screenshot: {ns.screenshot}")
    return 1 if bad or not states else 0


if __name__ == "__main__":
    sys.exit(main())
