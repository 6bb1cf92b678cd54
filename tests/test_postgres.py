"""The tracking stack users deploy, for real: a packed search tracked into `mlflow server` on
PostgreSQL with basic auth and served artifacts, as k8s/ runs it (tests/postgres.py), then read
back by `paceray report` through that server. The SQLite-backed server is every other test's."""

from __future__ import annotations

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
