"""`paceray ui`: the MLflow UI on the embedded store, and nothing left serving it once stopped."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request

import psutil

from conftest import PACERAY
from paceray.tracking.server import free_port


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def test_ui_serves_the_store_and_sigterm_stops_every_process(tmp_path):
    from mlflow.tracking import MlflowClient

    from paceray.tracking import ui_view

    store = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.create_experiment("seen-in-the-ui")
    search = client.create_run(exp, run_name="search-seen", tags={"paceray.kind": "search"}).info.run_id
    key = ui_view.save_comparison(client, exp, search, ui_view.Comparison("seen", "eval/fid", "min", ("curriculum.order",)))
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
        # the URL of the newest search's comparison (tests/test_browser.py opens one for real)
        assert f"the trials of search-seen compared: {ui_view.comparison_url(base, exp, key)}" in log.read_text()
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


def test_ui_of_an_unknown_experiment_is_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("there")
    r = subprocess.run([PACERAY, "ui", "nope", "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'mlflow.db'}: no experiment 'nope' (there: Default, there)")
    assert "Traceback" not in r.stderr


def test_the_shared_view_decodes_as_mlflow_reads_it():
    """The value MLflow's UI inflates: a JSON envelope whose state is `deflate;` + base64 of a zlib
    stream (pako.deflate's format) of the page state."""
    import base64
    import json
    import zlib

    from paceray.tracking import ui_view

    value = json.loads(ui_view.encode("paceray search q", ui_view.comparison_state(
        "P1", "eval/fid", "min", ["curriculum.order"], ["train/loss", "eval/fid", "system/cpu_utilization_percentage"])))
    assert value["name"] == "paceray search q" and isinstance(value["createdAt"], int)
    assert value["state"].startswith("deflate;")
    state = json.loads(zlib.decompress(base64.b64decode(value["state"].removeprefix("deflate;"))))
    assert state["searchFilter"] == "tags.mlflow.parentRunId = 'P1'"
    assert state["orderByKey"] == "metrics.`eval/fid`" and state["orderByAsc"] is True
    assert state["selectedColumns"] == ["metrics.`eval/fid`", "params.`curriculum.order`"]
    charts = state["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in charts if not c["deleted"] and c["type"] == "LINE"] == [("LINE", "eval/fid")]
    assert sorted(c["metricKey"] for c in charts if c["deleted"]) == ["system/cpu_utilization_percentage", "train/loss"]
    assert {c["metricSectionId"] for c in charts} == {s["uuid"] for s in state["compareRunSections"]}
    url = ui_view.comparison_url("http://h:5000/", "3", "paceray-P1")
    assert url == ("http://h:5000/#/experiments/3/runs?viewStateShareKey=paceray-P1&compareRunsMode=CHART"
                   "&workflowType=machine_learning")


def test_a_seeded_search_view_groups_its_runs_by_arm():
    """With replicates the view groups runs by their `paceray.arm` tag (the UI's `groupBy`: one
    mean line per arm with its min–max band); without, there is no grouping."""
    from paceray.tracking import ui_view

    grouped = ui_view.comparison_state("P1", "eval/fid", "min", ["curriculum.order"], group_by_tag="paceray.arm")
    assert grouped["groupBy"] == {"aggregateFunction": "average",
                                  "groupByKeys": [{"mode": "tag", "groupByData": "paceray.arm"}]}
    assert grouped["useGroupedValuesInCharts"] is True
    assert grouped["selectedColumns"][-1] == "tags.`paceray.arm`"
    assert "groupBy" not in ui_view.comparison_state("P1", "eval/fid", "min", ["curriculum.order"])
