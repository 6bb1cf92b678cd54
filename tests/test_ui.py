"""`paceray ui`: the MLflow UI on the embedded store, and nothing left serving it once stopped."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request

import psutil

from conftest import PACERAY
from paceray.mlflow_server import free_port


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def test_ui_serves_the_store_and_sigterm_stops_every_process(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{store}").create_experiment("seen-in-the-ui")
    port = free_port()
    # Its output to a file, not a pipe: reading the pipe of a server that is still running would
    # block the failure message for ever.
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PACERAY, "ui", "--run-dir", str(tmp_path), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # its start under the suite's load, as LocalServer.start waits
        while not _answers(base + "/health"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/get-by-name"
                                      "?experiment_name=seen-in-the-ui", timeout=10).read()
        assert b"seen-in-the-ui" in body
        # SIGTERM, as a closed terminal, `timeout` or a service manager sends it: every process
        # serving the store goes.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while True:
            serving = [p for p in psutil.process_iter(["cmdline"]) if str(store) in " ".join(p.info["cmdline"] or [])]
            if not serving and not _answers(base + "/health"):
                break
            assert time.monotonic() < deadline, f"still serving {store}: {serving}"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.process_iter(["cmdline"]):  # whatever the test's failure left behind
            if str(store) in " ".join(p.info["cmdline"] or []):
                p.kill()
