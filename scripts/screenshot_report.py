"""Open a report (or any HTML page) in headless Chromium and save a screenshot PNG, to look at what a person sees.

    python scripts/screenshot_report.py RUN_DIR/report/index.html --out report.png [--width 1400] [--height 4000]

Needs a Chromium-family browser on PATH (Debian: `apt-get install chromium`). Chromium's `--screenshot` captures the
window, so `--height` should be at least the page's height; what is below it is cut off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_loop.common.files import atomic_write_bytes

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
TIMEOUT_S = 120


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, width: int, height: int, browser: str) -> None:
    """Render `page` at width x height and write the PNG to `out`; the browser and every child it started are
    stopped before this returns, also when it hangs."""
    with tempfile.TemporaryDirectory(prefix="screenshot-") as scratch:
        profile, shot = Path(scratch) / "profile", Path(scratch) / "screenshot.png"
        command = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                   f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={shot}", page.resolve().as_uri()]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox on
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # its own process group, so all of it can be stopped
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            output = f"no screenshot after {TIMEOUT_S} s"
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # helpers the browser left running
            except ProcessLookupError:
                pass
            process.wait()
        if not shot.is_file() or shot.stat().st_size == 0:
            raise SystemExit(f"screenshot_report: {browser} wrote no screenshot:\n{output}")
        atomic_write_bytes(out, shot.read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the HTML file, e.g. RUN_DIR/report/index.html")
    parser.add_argument("--out", type=Path, required=True, help="where the PNG goes")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"screenshot_report: {args.page} does not exist; write a report with `rlhf-loop report RUN_DIR`",
              file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print(f"screenshot_report: no headless browser found (looked for {', '.join(BROWSERS)}); "
              f"install one, e.g. `apt-get install chromium`", file=sys.stderr)
        return 2
    screenshot(args.page, args.out, args.width, args.height, browser)
    print(f"screenshot_report: {args.out} ({args.width}x{args.height}, {browser})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
