"""Renders the demo's HTML report to `docs/report.png` in headless Chromium (Debian package `chromium`).

    .venv/bin/python examples/demo.py --out /tmp/netsqueeze-demo
    .venv/bin/python docs/render_report.py /tmp/netsqueeze-demo/report.html
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="an HTML report (CompileReport.to_html(), netsqueeze compile --report)")
    ap.add_argument("--out", default=str(DOCS / "report.png"))
    ap.add_argument("--size", default="1100,2200", help="window width,height in pixels")
    a = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 1
    out = Path(a.out).resolve()
    with tempfile.TemporaryDirectory() as profile:
        tmp = out.with_name(out.name + ".tmp.png")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={a.size}", f"--screenshot={tmp}",
                        Path(a.report).resolve().as_uri()], check=True, capture_output=True, timeout=120)
        tmp.replace(out)  # atomic: a failed render leaves the previous PNG
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
