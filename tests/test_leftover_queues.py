"""Trial queues nobody delivered, found at a search's end (paceray.search.leftover_queues), on
the shared Ray cluster and its MLflow server: what the driver can reach it delivers, the rest it
names with node and path; `paceray report` names them again from the search's parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from paceray.protocol import keys
from paceray.tracking import stranded_queues

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import ray

    from paceray.cluster import queue_locations
    from paceray.protocol import TrialContext
    from paceray.search import leftover_queues
    from paceray.tracking import spool
    from paceray.trial.runner import open_located_run_log

    root, uri, runs = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
    actor = queue_locations.start()

    @ray.remote(num_cpus=0)
    def rank0(run_id, tracking_uri):
        """A trial's rank 0 as the platform opens it: logs a row and closes its queue."""
        context = TrialContext(trial_id="t", run_id=run_id, tracking_uri=tracking_uri, storage=str(root),
                               run_dir=str(root / "runs"), metric="m", open_run_log=open_located_run_log)
        log = context.open_run_log(context)
        log.log_metrics({"m": 1.5}, 1)
        return log.close(timeout=2)  # None: delivered; else what waits

    # cut off from MLflow (a port nothing listens on) and gone: its row waits in its queue
    cut_off = ray.get(rank0.remote(runs["cut_off"], "http://127.0.0.1:9"))
    # delivered as it closed: nothing to do at the end
    ray.get(rank0.remote(runs["delivered"], uri))
    # a node Ray no longer knows (a lost node), its disk not this one: nothing here to deliver
    lost = "f" * 56
    ray.get(actor.open.remote({"run_id": runs["lost"], "node_id": lost, "ip": "10.9.9.9",
                               "path": str(root / "elsewhere" / runs["lost"])}))
    # the same lost node, its disk shared with this one (the marker its opener left): delivered here
    shared = root / "runs" / "mlflow-spool" / runs["shared"]
    spool.append(shared, {"kind": "metrics", "run_id": runs["shared"], "step": 1, "timestamp": spool.now_ms(),
                          "metrics": {"m": 2.5}})
    queue_locations.marker(shared, lost).touch()
    ray.get(actor.open.remote({"run_id": runs["shared"], "node_id": lost, "ip": "10.9.9.9", "path": str(shared)}))

    left = leftover_queues.settle(actor, uri, {}, root / "records")
    print(json.dumps({"cut_off": cut_off, "left": left}))
''')


def _run(shared, tmp_path, runs: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), shared.uri, json.dumps(runs)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **shared.env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_end_delivers_what_it_reaches_and_names_the_rest_with_node_and_path(shared, tmp_path):
    """Four queues at a search's end: a rank 0 cut off from MLflow on this node (its row waits),
    one that delivered as it closed, and two of a node Ray no longer knows (a lost node: an id
    no node has), one on a disk the driver cannot see, one on a shared disk. The driver delivers
    the first and the last, and names the third with its node and path."""
    client = shared.client()
    experiment = client.create_experiment(f"leftover-{tmp_path.name}")
    runs = {k: client.create_run(experiment).info.run_id for k in ("cut_off", "delivered", "lost", "shared")}
    out = _run(shared, tmp_path, runs)
    assert out["cut_off"] and "paceray replay-tracking" in out["cut_off"]  # the rank 0 could not deliver
    # delivered at the end: the queue cut off from MLflow (on this node) and the lost node's
    # queue on a shared disk; the one delivered as it closed was never in question
    for key, value in (("cut_off", 1.5), ("delivered", 1.5), ("shared", 2.5)):
        assert [(m.step, m.value) for m in client.get_metric_history(runs[key], "m")] == [(1, value)], key
    assert not (tmp_path / "runs" / "mlflow-spool" / f"{runs['cut_off']}").exists()
    assert not list((tmp_path / "runs" / "mlflow-spool").glob("*.node-*"))  # no marker outlives its queue
    # named: the lost node's queue on a disk the driver cannot see
    (left,) = out["left"]
    assert left["run_id"] == runs["lost"] and left["node_alive"] is False and left["waiting"] is None
    line = stranded_queues.describe(left, shared.uri)
    assert "10.9.9.9" in line and "lost" in line and str(tmp_path / "elsewhere" / runs["lost"]) in line
    assert f"paceray replay-tracking {tmp_path / 'elsewhere' / runs['lost']} --tracking-uri {shared.uri}" in line


def test_report_names_the_queues_a_search_left(shared, tmp_path):
    """`paceray report` of a search whose end left a queue: the line the end printed, again."""
    client = shared.client()
    experiment = client.create_experiment(f"stranded-{tmp_path.name}")
    left = [{"run_id": "r1", "trial_id": "trial-1", "node_id": "ab" * 28, "ip": "10.9.9.8", "node_alive": False,
             "path": "/runs/mlflow-spool/r1", "waiting": None}]
    parent = client.create_run(experiment, tags={keys.KIND_TAG: "search", keys.METRIC_TAG: "eval/fid",
                                                 stranded_queues.TAG: stranded_queues.tag_value(left)}).info.run_id
    child = client.create_run(experiment, tags={keys.KIND_TAG: "trial", keys.PARENT_TAG: parent,
                                                keys.METRIC_TAG: "eval/fid"}).info.run_id
    client.log_metric(child, "eval/fid", 3.0, step=10)
    client.set_terminated(child)
    client.set_terminated(parent)
    r = shared.paceray("report", experiment_name(client, experiment))
    assert "trial queue(s) the search's end found undelivered (1):" in r.stdout, r.stdout[-3000:]
    assert "run r1 (trial trial-1): its queue on node 10.9.9.8 (abababab, lost) at /runs/mlflow-spool/r1" in r.stdout


def experiment_name(client, experiment_id: str) -> str:
    return client.get_experiment(experiment_id).name
