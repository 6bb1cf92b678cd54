"""The tracking stack users deploy, for real: a packed search tracked into `mlflow server` on
PostgreSQL with basic auth and served artifacts, as k8s/ runs it (tests/postgres.py), then read
back by `paceray report` through that server. The SQLite-backed server is every other test's."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import postgres_missing, prelaunched, tiny_base, write_spec

pytestmark = pytest.mark.slow


@prelaunched
def search_on_postgres(shared, folder):
    from postgres import Postgres, PostgresMlflowServer, postgres_bin

    if postgres_bin() is None:
        return None
    pg = Postgres().start()
    try:
        server = PostgresMlflowServer(pg, folder / "mlflow", "search").start()
        try:
            spec = write_spec(folder / "pg.yaml", "pg-search",
                              tiny_base(train={"steps": 40}, eval={"every": 20, "fid_samples": 32}),
                              search={"curriculum.order": {"grid": ["none", "easy-to-hard"]}}, tune={"pack": 2})
            tune = shared.paceray("tune", spec, "--run-dir", folder / "runs", "--tracking-uri", server.uri,
                                  env=server.client_env, tracking=False, check=False)
            report = shared.paceray("report", "pg-search", "--tracking-uri", server.uri, "--out", folder / "report",
                                    env=server.client_env, tracking=False, check=False)
            client = server.client()
            runs = client.search_runs([client.get_experiment_by_name("pg-search").experiment_id])
            return {"tune": tune, "report": report, "server": server, "folder": folder,
                    "runs": runs, "fid": {r.info.run_id: [m.step for m in client.get_metric_history(
                        r.info.run_id, "eval/fid")] for r in runs}}
        finally:
            server.stop()
    finally:
        pg.stop()


def test_a_packed_search_tracks_into_mlflow_on_postgresql(search_on_postgres):
    got = search_on_postgres
    if got is None:
        postgres_missing()
    assert got["tune"].returncode == 0, got["tune"].stdout[-4000:] + got["tune"].stderr[-3000:]
    trials = [r for r in got["runs"] if r.data.tags.get("paceray.kind") == "trial"]
    (parent,) = [r for r in got["runs"] if r.data.tags.get("paceray.kind") == "search"]
    assert sorted(r.data.params["curriculum.order"] for r in trials) == ["easy-to-hard", "none"]
    assert len({r.data.tags["paceray.pack"] for r in trials}) == 1  # one pack, two runs
    assert all(r.info.status == "FINISHED" and got["fid"][r.info.run_id] == [20, 40] for r in trials)
    assert parent.info.status == "FINISHED"
    # artifacts went through the server (--serve-artifacts) into its folder
    server = got["server"]
    assert (server.artifact_dir(parent) / "report" / "report.html").is_file()
    assert (server.artifact_dir(parent) / "best" / "pipeline" / "model_index.json").is_file()
    assert all((server.artifact_dir(r) / "curriculum" / "schedule.png").is_file() for r in trials)
    assert got["report"].returncode == 0, got["report"].stdout[-3000:] + got["report"].stderr[-3000:]
    assert (got["folder"] / "report" / "report.html").is_file()


def test_sixteen_loggers_through_a_server_restart_deliver_every_row_once(tmp_path, postgres_mlflow, monkeypatch):
    """16 trial loggers (the real RunLogger and its queue, as threads here) write a row of 25
    metric values every 0.5 s for 25 s into the PostgreSQL server, which is stopped 8 s in and
    started again (same port, database and folder) about 5 s later. Afterwards every row of every
    run is in MLflow exactly once, with its value: none lost in the outage, none delivered twice
    by a retry of a call the server had half-answered."""
    from paceray.tracking.runlog import FAST_FAIL_ENV, RunLogger

    server = postgres_mlflow
    for key, value in {**server.client_env, **FAST_FAIL_ENV}.items():
        monkeypatch.setenv(key, value)  # RunLogger would set the fast-fail env for the whole session
    client = server.client()
    experiment = client.create_experiment(f"restart-{tmp_path.name}")
    loggers = [RunLogger(client.create_run(experiment).info.run_id, server.uri, tmp_path / "runs")
               for _ in range(16)]
    rows = [0] * len(loggers)
    stop = threading.Event()

    def write(k: int):
        time.sleep(k * 0.5 / len(loggers))  # the loggers' rows spread over the half second
        start = time.monotonic()
        while not stop.is_set():
            loggers[k].log_metrics({f"train/m{i:02d}": rows[k] + i / 100 for i in range(25)}, rows[k])
            rows[k] += 1
            stop.wait(max(0.0, start + rows[k] * 0.5 - time.monotonic()))

    threads = [threading.Thread(target=write, args=(k,), daemon=True) for k in range(len(loggers))]
    try:
        for t in threads:
            t.start()
        time.sleep(8)
        server.stop()
        time.sleep(5)
        server.start()
        time.sleep(12)
    finally:
        stop.set()
        for t in threads:
            t.join()
        left = [lg.close(timeout=120) for lg in loggers]
        if server.proc is None or server.proc.poll() is not None:
            server.start()  # the session's other tests use it
    assert not any(left), left
    assert min(rows) >= 40, rows
    for logger, written in zip(loggers, rows):
        for i in (0, 7, 24):
            history = client.get_metric_history(logger.run_id, f"train/m{i:02d}")
            assert sorted(m.step for m in history) == list(range(written)), (logger.run_id, i)
            assert all(m.value == pytest.approx(m.step + i / 100) for m in history)


def test_forty_concurrent_loggers_log_batch_calls_all_succeed(tmp_path, postgres_mlflow, monkeypatch):
    """As many log_batch callers at once as the server has request threads (40), 10 calls each:
    MLflow's log_batch
    holds a database connection while it takes a second one, so with SQLAlchemy's default pool
    (15) the calls stalled for the pool's 30 s timeout and some failed, answered 400 BAD_REQUEST
    ("QueuePool limit ... reached"): a client error, which a queue sets aside as undeliverable.
    The server's pool (paceray.tracking.server.POOL_ENV, k8s/base/mlflow.yaml) always leaves a
    connection free. Checked to fail without it."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import Metric

    from paceray.tracking.runlog import FAST_FAIL_ENV

    server = postgres_mlflow
    for key, value in {**server.client_env, **FAST_FAIL_ENV, "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}.items():
        monkeypatch.setenv(key, value)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.create_experiment(f"concurrent-{tmp_path.name}")
    runs = [client.create_run(experiment).info.run_id for _ in range(40)]
    barrier = threading.Barrier(len(runs))

    def log(run_id: str) -> None:
        barrier.wait()
        for step in range(10):  # a burst is not enough: the stall needs 15 calls inside one window
            client.log_batch(run_id, metrics=[Metric(f"m{i}", float(i), 0, step) for i in range(25)])

    with ThreadPoolExecutor(len(runs)) as pool:
        errors = [f.exception() for f in [pool.submit(log, r) for r in runs]]
    assert not any(errors), [str(e)[:200] for e in errors if e]
    assert all(len(client.get_metric_history(r, "m3")) == 10 for r in runs)
