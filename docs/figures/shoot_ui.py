"""Screenshots of a finished pipeline's MLflow experiment, as ``ftcl ui`` opens it, for the docs.

    .venv/bin/python docs/figures/shoot_ui.py PROJECT_FOLDER [--out docs/figures]

Starts ``ftcl ui`` with no option in PROJECT_FOLDER (the folder holding ``config/config.yaml`` and
``results/``: it opens that config's experiment), and with Debian's chromium (headless, driven by
Playwright) saves ``ui-row-runs.png`` (the runs table: one run per ablation row on top, the first
row opened on its seed runs) and ``ui-compare-rows.png`` (MLflow's compare view of every row run:
the tables' means, deltas and intervals side by side). Needs Playwright's Python package and
``/usr/bin/chromium`` (or ``$FTCL_CHROMIUM``); downloads nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

CHROMIUM = os.environ.get("FTCL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
#: MLflow's assistant panel closed, so the screenshots show the page
CLOSED_ASSISTANT = """
    localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""
NAME_CELL = "[col-id='attributes.`Run Name`']"


def start_ui(project: Path) -> tuple[subprocess.Popen, str]:
    """``ftcl ui --port 0`` in ``project``: the process and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "ftcl.cli", "ui", "--port", "0"], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        url = next((ln.strip() for ln in list(lines) if ln.strip().startswith("http://")), None)
        if url:
            print("".join(lines), end="")
            return proc, url
        time.sleep(0.2)
    stop_ui(proc)
    raise SystemExit(f"ftcl ui printed no URL:\n{''.join(lines)}")


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a person stops it
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def row_line(page, name: str):
    return page.locator("[role=row]").filter(has=page.get_by_role("link", name=name, exact=True))


def shoot(url: str, rows: list[str], out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1600, "height": 900}).new_page()
        page.set_default_timeout(60_000)
        page.add_init_script(CLOSED_ASSISTANT)
        page.goto(url)
        for row in rows:
            page.get_by_role("link", name=row, exact=True).wait_for()
        row_line(page, rows[0]).locator(f"{NAME_CELL} button").first.click()  # its seed runs under it
        page.get_by_role("link", name=f"{rows[0]} · seed 0", exact=True).wait_for()
        written.append(out / "ui-row-runs.png")
        page.screenshot(path=str(written[-1]))
        row_line(page, rows[0]).locator(f"{NAME_CELL} button").first.click()  # closed again
        page.get_by_role("link", name=f"{rows[0]} · seed 0", exact=True).wait_for(state="hidden")
        for row in rows:
            row_line(page, row).locator("input.ag-checkbox-input").first.check()
        page.get_by_role("button", name="Compare", exact=True).click()
        page.get_by_text(f"Comparing {len(rows)} Runs").wait_for()
        switch = page.get_by_role("switch", name="Metrics - Show diff only")
        switch.wait_for()
        switch.scroll_into_view_if_needed()
        page.set_viewport_size({"width": 1600, "height": 1800})
        written.append(out / "ui-compare-rows.png")
        page.screenshot(path=str(written[-1]), full_page=True)
        browser.close()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="folder with config/config.yaml and a finished results/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    cfg = yaml.safe_load((args.project / "config" / "config.yaml").read_text())
    rows = [row["name"] for row in cfg["ablations"]]
    proc, url = start_ui(args.project.resolve())
    try:
        for path in shoot(url, rows, args.out):
            print(f"wrote {path}")
    finally:
        stop_ui(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
