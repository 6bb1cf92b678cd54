"""`make screenshots`: the README's pictures, taken by headless Chromium (Debian's `chromium`,
driven by Playwright: no browser download) from a real finished search.

It uses the newest search in the run directory (`--run-dir`, default ./runs, e.g. after
`make demo`), or runs the demo there first when it holds none. It then serves that store with
`paceray ui`, and writes:
- docs/img/report.png: the top of the search's report.html, as a file, offline;
- docs/img/mlflow-comparison.png: the URL `paceray ui` prints, in MLflow's UI.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACERAY = str(Path(sys.executable).parent / "paceray")


def _newest_report(run_dir: Path):
    from mlflow.tracking import MlflowClient

    from paceray.tracking import ui_view
    from paceray.tracking.server import embedded_store

    if not (run_dir / "mlflow.db").is_file():
        return None
    client = MlflowClient(tracking_uri=embedded_store(run_dir)[0])
    run = ui_view.latest_search(client, None)
    if run is None:
        return None
    report = Path(run.info.artifact_uri.removeprefix("file://")) / "report" / "report.html"
    return report if report.is_file() else None


def _serve(run_dir: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    out = open(log, "w")
    proc = subprocess.Popen([PACERAY, "ui", "--run-dir", str(run_dir), "--port", str(port)], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"paceray ui exited; see {log}")
            time.sleep(0.5)
    else:
        proc.terminate()
        raise SystemExit(f"paceray ui did not answer in 180 s; see {log}")
    found = re.search(r"compared: (\S+)", log.read_text())
    if not found:
        proc.terminate()
        raise SystemExit(f"paceray ui printed no comparison URL; see {log}")
    return proc, found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = parser.parse_args()
    run_dir, out = Path(args.run_dir).resolve(), Path(args.out)
    executable = shutil.which("chromium")
    if executable is None:
        raise SystemExit("make screenshots: no chromium on PATH (apt-get install chromium)")
    if _newest_report(run_dir) is None:
        print(f"no finished search in {run_dir}: running the demo there first", flush=True)
        subprocess.run([PACERAY, "tune", str(REPO / "search_spaces/quick.yaml"), "--run-dir", str(run_dir)], check=True)
    report = _newest_report(run_dir)
    if report is None:
        raise SystemExit(f"{run_dir}: the newest search has no report/report.html")
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    from paceray.tracking.server import free_port

    proc, url = _serve(run_dir, free_port(), run_dir / "screenshots-ui.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(report.as_uri())
            page.screenshot(path=out / "report.png")
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > 0",
                                   timeout=60_000)
            page.get_by_text("Compare by").first.wait_for(timeout=60_000)
            try:  # MLflow 3.17 opens its assistant's side panel: closed, the charts get its width
                page.get_by_role("button", name="Close").last.click(timeout=5_000)
            except Exception:
                pass
            time.sleep(2)  # the charts' fade-in
            page.screenshot(path=out / "mlflow-comparison.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"wrote {out / 'report.png'} and {out / 'mlflow-comparison.png'} (from {report})")


if __name__ == "__main__":
    main()
