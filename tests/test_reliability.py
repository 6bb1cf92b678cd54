"""Crashes, numerical faults, bad input and disk: each done for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import (REPO, Started, checkpoint_dirs, checkpoint_step, experiment_runs, history, kill_session,
                      mlflow_client, postgres_missing, prelaunched, registered_checkpoint_step, run_paceray, tiny_base,
                      wait_for_checkpoint, write_spec)
from paceray.tracking.server import LocalServer
from paceray.protocol.keys import VIEW_TAG

pytestmark = pytest.mark.slow



def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout[-2000:]
    err = r.stderr.strip()
    # Lines Ray forwards from its own processes start with "(Name pid=…)"; ours must hold no traceback.
    ours = [l for l in err.splitlines() if not l.lstrip("\x1b[0123456789;m").startswith("(")]
    assert not any("Traceback" in l for l in ours), err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("paceray: error: "), err[-2000:]
    for n in needles:
        assert n in last, (n, last)


# ----------------------------------------------------------------- worker crash


@prelaunched(long=True)
def crashed_trial(shared, tmp):
    """A `paceray train` on the shared cluster whose training worker is SIGKILLed mid-run; Ray
    Train restarts it from its last registered checkpoint. 300 steps (~15 s here): the kill must
    land mid-run even when a loaded machine registers the first checkpoint late. Twelve evals
    with checkpoint_keep 2, for test_checkpoints_stay_bounded."""
    import re

    base = tiny_base(train={"steps": 300, "log_every": 5, "checkpoint_keep": 2}, curriculum={"stage_steps": 60},
                     eval={"every": 25})
    spec = write_spec(tmp / "crash.yaml", "crash", base)
    run_dir = tmp / "runs"
    proc = shared.start("train", spec, "--run-dir", run_dir, log=tmp / "train.log")
    try:
        wait_for_checkpoint(run_dir, proc)  # a checkpoint Ray Train registered: the restart resumes from it
        at_kill = registered_checkpoint_step(run_dir)
        # The training worker of *this* run, by the pid Ray prints for it (the cluster is shared).
        pids = {int(p) for p in re.findall(r"\(RayTrainWorker pid=(\d+)\)", proc.output())}
        assert len(pids) == 1, pids
        os.kill(pids.pop(), signal.SIGKILL)
        out = proc.finish()
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    return {"proc": proc, "out": out, "at_kill": at_kill, "run_dir": run_dir, "spec": spec}


def test_killed_worker_restarts_from_its_last_checkpoint(crashed_trial, shared):
    out, at_kill = crashed_trial["out"], crashed_trial["at_kill"]
    assert crashed_trial["proc"].returncode == 0, out[-5000:]
    assert at_kill is not None and at_kill < 300, at_kill
    assert f"resumed from the checkpoint at step" in out, out[-5000:]
    client, runs = experiment_runs(shared, "crash")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    for key in ("train/loss", "curriculum/stage", "curriculum/t_min"):
        steps = [m.step for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.timestamp)]
        assert steps == list(range(5, 301, 5)), (key, steps)  # no step twice, no gap
    stage = dict(history(client, rid, "curriculum/stage"))
    assert all(stage[s] == min(4, (s - 1) // 60 + 1) for s in stage)


def test_checkpoints_stay_bounded(crashed_trial, shared):
    """Twelve evals, checkpoint_keep 2, a restart between: on disk only the best 2 by eval/fid
    plus the latest."""
    kept = checkpoint_dirs(crashed_trial["run_dir"])
    assert 2 <= len(kept) <= 3, kept
    assert kept[-1].name == "checkpoint_step00000300"  # the latest is always kept
    client, runs = experiment_runs(shared, "crash")
    fids = dict(history(client, runs[0].info.run_id, "eval/fid"))
    best_two = sorted(fids, key=fids.get)[:2]
    assert set(best_two) <= {checkpoint_step(p) for p in kept}


# ----------------------------------------------------------------- NaN


@prelaunched(long=True)
def nan_search_while_mlflow_away(shared, tmp_path):
    """A two-trial search (one trial's loss goes NaN) against a server stopped before either
    trains a step; then the server returns and the queues are replayed."""
    server = MlflowServer(tmp_path / "mlflow").start()
    spec = yaml.safe_load((REPO / "search_spaces/quick.yaml").read_text())
    spec["name"] = "nan"
    spec["base"]["train"].update({"steps": 30, "log_every": 5, "grad_clip": 0})
    spec["base"]["eval"].update({"every": 15, "fid_samples": 32, "sampler_steps": 4})
    spec["search"] = {"train.lr": {"grid": [0.002, 1000.0]}}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs"
    proc = shared.start("tune", path, "--run-dir", run_dir, "--tracking-uri", server.uri, log=tmp_path / "tune.log",
                        env={"PACERAY_TRACKING_FLUSH_TIMEOUT": "3", "PACERAY_DRIVER_WAIT": "0"}, tracking=False)
    try:
        deadline = time.monotonic() + 600
        # Both trials have their runs (and params): the server goes before either trains a step.
        while sum("train.lr" in r.data.params for r in _trial_runs(server, "nan")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        server.stop()
        out = proc.finish(timeout=600)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    server.start()
    try:
        for queue in sorted((run_dir / "mlflow-spool").iterdir()):
            if queue.is_dir():
                shared.paceray("replay-tracking", queue, "--tracking-uri", server.uri, tracking=False)
        trials = {r.data.params["train.lr"]: r for r in _trial_runs(server, "nan")}
        good_steps = [m.step for m in history_of(server, trials["0.002"], "train/loss")]
        report = shared.paceray("report", "nan", "--tracking-uri", server.uri, tracking=False)
    finally:
        server.stop()
    return {"returncode": proc.returncode, "out": out, "trials": trials, "good_steps": good_steps,
            "report": report.stdout, "workers": (run_dir / "searches" / "nan" / "workers.log").read_text()}


def test_nan_trial_fails_in_band_while_mlflow_is_away(nan_search_while_mlflow_away):
    """The failure travels in the trial's final Ray report, not through MLflow: with the server
    stopped before the NaN, the trial is FAILED in Tune and in the exit code, and not retried;
    the good trial and the search still finish; after the server returns and the queues are
    replayed, the run is FAILED with the reason."""
    got = nan_search_while_mlflow_away
    out = got["out"]
    assert got["returncode"] != 0, out[-3000:]
    assert "paceray: error: 1 of 2 trial(s) failed" in out
    # one attempt (Ray Train did not retry it), said by the worker into the search's worker log,
    # and by the search's progress line
    assert got["workers"].count("FAILED: non-finite loss") == 1
    assert re.search(r"\] trial \S+ failed: .*non-finite loss", out), out[-3000:]
    assert "unreachable" in out and "the search's report waits for MLflow" in out
    trials = got["trials"]
    assert trials["0.002"].info.status == "FINISHED"
    assert got["good_steps"] == [5, 10, 15, 20, 25, 30]
    bad = trials["1000.0"]
    assert bad.info.status == "FAILED" and "non-finite loss" in bad.data.tags["paceray.error"]
    assert "FAILED" in got["report"] and "non-finite loss" in got["report"]


def _trial_runs(server, experiment: str) -> list:
    try:
        exp = server.client().get_experiment_by_name(experiment)
        runs = server.client().search_runs([exp.experiment_id]) if exp else []
    except Exception:
        return []
    return [r for r in runs if r.data.tags.get("paceray.kind") == "trial"]


def history_of(server, run, key: str) -> list:
    return sorted(server.client().get_metric_history(run.info.run_id, key), key=lambda m: m.step)


@prelaunched
def nan_trial(shared, tmp_path):
    spec = write_spec(tmp_path / "nan1.yaml", "nan1",
                      tiny_base(train={"steps": 60, "lr": 1000.0, "grad_clip": 0, "log_every": 5}))
    return shared.paceray("train", spec, "--run-dir", tmp_path / "runs", check=False)


def test_nan_loss_in_a_single_trial_is_one_line(nan_trial, shared):
    r = nan_trial
    assert_one_line_error(r, "non-finite loss")
    _, runs = experiment_runs(shared, "nan1")
    assert runs[0].info.status == "FAILED"


# ----------------------------------------------------------------- bad input: nothing written


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--address", "127.0.0.1:1"], ["--address 127.0.0.1:1"]),
        (["--address", "http://127.0.0.1:8265"], ["GCS address"]),
        (["--tracking-uri", "http://127.0.0.1:1"], ["MLflow tracking server http://127.0.0.1:1 is unreachable"]),
        (["--set", "data.dataset=mnist", "--set", "data.source=/nonexistent/mnist"], ["/nonexistent/mnist"]),
        (["--set", "model.preset=small", "--set", "data.image_size=6"], ["data.image_size"]),
        (["--set", "curriculum.order=sideways"], ["base.curriculum.order"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, storage, args, needles):
    spec = write_spec(tmp_path / "bad.yaml", "bad", tiny_base())
    run_dir = tmp_path / "runs"
    r = run_paceray("train", spec, "--run-dir", run_dir, *args, check=False, timeout=300)
    assert_one_line_error(r, *needles)
    assert not run_dir.exists(), list(run_dir.rglob("*"))[:10]


def test_wrong_mlflow_credentials_are_one_line_before_anything_is_written(tmp_path):
    # A real MLflow server with its basic-auth app: /health answers anyone, every API call wants
    # a user. A wrong password is one line at once, not a traceback at the first write.
    import urllib.request

    from paceray.tracking.server import SERVER_ENV, free_port, server_argv

    port = free_port()
    root = tmp_path / "auth"
    root.mkdir()
    env = {**os.environ, **SERVER_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": "right-password-1234",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret"}
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(server_argv(root, port, "--workers", "1", "--app-name", "basic-auth"), cwd=root,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        spec = write_spec(tmp_path / "bad.yaml", "bad", tiny_base())
        run_dir = tmp_path / "runs"
        r = run_paceray("train", spec, "--run-dir", run_dir, "--tracking-uri", uri, check=False, timeout=300,
                        env={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"})
        assert_one_line_error(r, f"MLflow tracking server {uri} refused a request as user 'admin'",
                              "MLFLOW_TRACKING_PASSWORD")
        assert not run_dir.exists(), list(run_dir.rglob("*"))[:10]
    finally:
        server.terminate()  # the supervisor ends the server's whole group
        server.wait(timeout=60)


def test_a_truncated_train_shard_is_one_line_before_any_trial(tmp_path):
    # As a full disk or a kill mid-write on a shared volume leaves a prepared shard: one line
    # naming the file before Ray starts, not a worker traceback on each of Ray's retries.
    from trainables.diffusion import data

    env = {"PACERAY_STORAGE": str(tmp_path / "storage")}  # the session's own storage stays whole
    data.prepare("digits", tmp_path / "storage")  # as `paceray data prepare digits` writes it
    (shard,) = (tmp_path / "storage" / "datasets" / "digits").glob("train-*.parquet")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    spec = write_spec(tmp_path / "bad.yaml", "bad", tiny_base())
    run_dir = tmp_path / "runs"
    r = run_paceray("train", spec, "--run-dir", run_dir, check=False, timeout=300, env=env)
    assert_one_line_error(r, f"{shard}: unreadable Parquet shard", f"delete {shard.parent} and prepare again")
    assert not run_dir.exists(), list(run_dir.rglob("*"))[:10]


def _copy_of_crashed_run(tmp_path, crashed_trial, shared) -> Path:
    """A copy of the crashed trial's finished run directory (Ray's run snapshot names its
    checkpoints relative to it). Its pointer is moved to a run of its own, so that what the copy
    trains is not logged into the crashed trial's run, which other tests read."""
    import json
    import shutil

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs"
    shutil.copytree(crashed_trial["run_dir"], run_dir)
    (pointer,) = (run_dir / "train").glob("*/latest.json")
    client = MlflowClient(tracking_uri=shared.uri)
    exp = f"crash-copy-{tmp_path.name}"
    run = client.create_run(client.create_experiment(exp))
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "run_id": run.info.run_id, "experiment": exp}))
    return run_dir


def _truncate(checkpoint: Path) -> Path:
    """As a full disk leaves it."""
    state = checkpoint / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    return state


def test_a_corrupted_latest_checkpoint_resumes_from_the_newest_earlier_one(tmp_path, crashed_trial, shared):
    """Ray's record of the run is left as it is; the trainable loads the earlier checkpoint
    instead of the one Ray names, trains on from there to its end, and its new checkpoints do
    not reuse the skipped one's folder (Ray still keeps that one and may delete it later)."""
    from paceray.trial.trainer import latest_checkpoint
    from trainables.denoiser.export import check_checkpoint

    run_dir = _copy_of_crashed_run(tmp_path, crashed_trial, shared)
    *earlier, latest = checkpoint_dirs(run_dir)
    assert earlier and latest.name == "checkpoint_step00000300", (earlier, latest)
    bad = _truncate(latest)
    r = shared.paceray("train", crashed_trial["spec"], "--run-dir", run_dir, "--resume", check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    fallback = checkpoint_step(earlier[-1])
    assert f"{bad}: corrupted checkpoint (" in out and f"resuming from {earlier[-1]} (step {fallback})" in out, out[-5000:]
    assert f"resumed from the checkpoint at step {fallback}" in out, out[-5000:]
    client, runs = experiment_runs(shared, f"crash-copy-{tmp_path.name}")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(fallback + 5, 301, 5))
    (snapshot,) = (run_dir / "ray").glob("*/checkpoint_manager_snapshot.json")
    now = latest_checkpoint(snapshot.parent)
    assert now.name == "checkpoint_step00000300-resumed", now
    check_checkpoint(now)


def test_resume_when_no_checkpoint_loads_is_one_line(tmp_path, crashed_trial, shared):
    run_dir = _copy_of_crashed_run(tmp_path, crashed_trial, shared)
    checkpoints = checkpoint_dirs(run_dir)
    bad = [_truncate(c) for c in checkpoints]
    r = shared.paceray("train", crashed_trial["spec"], "--run-dir", run_dir, "--resume", check=False)
    assert_one_line_error(r, str(bad[-1]), "corrupted checkpoint", "no earlier checkpoint", "loads either")


@pytest.mark.parametrize("case", ["architecture", "other store", "torn pointer"])
def test_a_resume_that_cannot_continue_its_run_is_one_line_and_touches_nothing(tmp_path, crashed_trial, shared, case):
    run_dir = _copy_of_crashed_run(tmp_path, crashed_trial, shared)
    (pointer,) = (run_dir / "train").glob("*/latest.json")
    before = sorted(p.name for p in checkpoint_dirs(run_dir))
    args, tracking, needles = [], True, []
    if case == "architecture":  # another network than the checkpoints hold
        args, needles = ["--set", "model.preset=small"], ["--resume: model.preset 'tiny' -> 'small'", "cannot follow"]
    elif case == "other store":  # the embedded store instead of the server the run lives on
        tracking, needles = False, [f"is tracked in {shared.uri}, not the embedded store", f"--tracking-uri {shared.uri}"]
    else:
        pointer.write_text('{"trial_id": "crash-')
        needles = [f"{pointer}: unreadable", f"remove {pointer.parent}"]
    r = shared.paceray("train", crashed_trial["spec"], "--run-dir", run_dir, "--resume", *args, tracking=tracking,
                       check=False)
    assert_one_line_error(r, *needles)
    assert sorted(p.name for p in checkpoint_dirs(run_dir)) == before
    assert not (run_dir / "mlflow.db").exists()


def test_a_torn_ray_checkpoint_snapshot_on_resume_is_one_line(tmp_path, crashed_trial, shared):
    """Ray Train rewrites its list of registered checkpoints in place: a kill mid-write leaves it
    empty, and Ray cannot resume from it. One line naming the file, not a traceback."""
    import shutil

    run_dir = tmp_path / "runs"
    shutil.copytree(crashed_trial["run_dir"], run_dir)
    (snapshot,) = (run_dir / "ray").glob("*/checkpoint_manager_snapshot.json")
    snapshot.write_text("")
    r = shared.paceray("train", crashed_trial["spec"], "--run-dir", run_dir, "--resume", check=False)
    assert_one_line_error(r, str(snapshot), "unreadable", "a write cut short")


def test_resume_without_an_earlier_run_is_one_line(tmp_path, storage):
    spec = write_spec(tmp_path / "r.yaml", "never", tiny_base())
    r = run_paceray("train", spec, "--run-dir", tmp_path / "runs", "--resume", check=False)
    assert_one_line_error(r, "--resume", "never")
    r = run_paceray("tune", spec, "--run-dir", tmp_path / "runs", "--resume", check=False)
    assert_one_line_error(r, "--resume", "never")


def test_debug_shows_the_traceback(tmp_path):
    spec = write_spec(tmp_path / "d.yaml", "d", tiny_base(curriculum={"num_clusters": 0}))
    r = run_paceray("--debug", "train", spec, check=False, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


# ----------------------------------------------------------------- MLflow outage


class MlflowServer(LocalServer):
    """A real `mlflow server` on loopback (the embedded store's own), that the test stops and
    restarts on the same port and store."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root)

    client_env: dict = {}  # no authentication on the embedded store's server

    def client(self):
        return mlflow_client(self.run_dir)

    def artifact_dir(self, run) -> Path:
        return Path(run.info.artifact_uri.removeprefix("file://"))


def _start_train(shared, spec: Path, run_dir: Path, uri: str, flush_timeout: float = 300, env=None) -> Started:
    # The trial's end waits up to `flush_timeout` for the server to take its queue: a restarted
    # server on a loaded machine can answer only after the last step (its start took ~40 s once).
    return shared.start("train", spec, "--run-dir", run_dir, "--tracking-uri", uri, log=run_dir.parent / "train.log",
                        env={"PACERAY_TRACKING_FLUSH_TIMEOUT": str(flush_timeout), **(env or {})}, tracking=False)


def _wait_for_metrics(server: MlflowServer, experiment: str, proc, at_least: int = 2):
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.output()[-3000:]
        try:
            exp = server.client().get_experiment_by_name(experiment)
            runs = server.client().search_runs([exp.experiment_id]) if exp else []
            if runs and len(server.client().get_metric_history(runs[0].info.run_id, "train/loss")) >= at_least:
                return runs[0].info.run_id
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError("no metrics arrived")


def _delivered(server, run_id: str) -> dict:
    """What the store holds of run `run_id` (read from the store itself: the server may be stopped)."""
    client = server.client()
    run = client.get_run(run_id)
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in ("train/loss", "eval/fid")}
    system = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    return {"status": run.info.status, "steps": steps, "artifacts": server.artifact_dir(run), "system": system,
            "metrics": set(run.data.metrics)}


@prelaunched(long=True)
def outage_trial(shared, tmp_path):
    """A trial whose server goes away mid-run for a while, then returns on the same port and store."""
    return _outage_trial(shared, tmp_path, MlflowServer(tmp_path / "mlflow").start())


@prelaunched(long=True)
def outage_trial_postgres(shared, tmp_path):
    """The same against the deployed kind of server: `mlflow server` on PostgreSQL, basic auth,
    artifacts served (tests/postgres.py); None where no PostgreSQL is installed."""
    from postgres import Postgres, PostgresMlflowServer, postgres_bin

    if postgres_bin() is None:
        return None
    pg = Postgres().start()
    try:
        return _outage_trial(shared, tmp_path, PostgresMlflowServer(pg, tmp_path / "mlflow", "outage").start())
    finally:
        pg.stop()


def _outage_trial(shared, tmp_path, server) -> dict:
    spec = write_spec(tmp_path / "o.yaml", "outage",
                      tiny_base(train={"steps": 200, "log_every": 5}, curriculum={"stage_steps": 40},
                                eval={"every": 50}))
    # A system-metrics sample every second: several fall in the outage.
    proc = _start_train(shared, spec, tmp_path / "runs", server.uri,
                        env={"PACERAY_SYSTEM_METRICS_INTERVAL": "1", **server.client_env})
    try:
        run_id = _wait_for_metrics(server, "outage", proc)
        server.stop()  # gone mid-run: training must go on
        away = time.time() * 1000
        time.sleep(8)
        assert proc.poll() is None, proc.output()[-3000:]
        back = time.time() * 1000
        server.start()  # back on the same port and store
        out = proc.finish()
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
        server.stop()
    return {"returncode": proc.returncode, "out": out, "run": _delivered(server, run_id),
            "queue": tmp_path / "runs" / "mlflow-spool" / run_id, "away": (away, back)}


def test_mlflow_outage_mid_run_loses_nothing(outage_trial):
    _check_outage(outage_trial)


def test_mlflow_outage_mid_run_loses_nothing_on_postgresql(outage_trial_postgres):
    if outage_trial_postgres is None:
        postgres_missing()
    _check_outage(outage_trial_postgres)


def _check_outage(got: dict) -> None:
    assert got["returncode"] == 0, got["out"][-4000:]
    run = got["run"]
    assert run["status"] == "FINISHED"
    assert run["steps"]["train/loss"] == list(range(5, 201, 5))
    assert run["steps"]["eval/fid"] == [50, 100, 150, 200]
    assert (run["artifacts"] / "curriculum" / "schedule.png").is_file()
    assert not got["queue"].exists()  # all delivered
    # System metrics, sampled on rank 0's node through the same queue: every sample arrived, the
    # ones taken while the server was away too.
    steps = [step for step, _ in run["system"]]
    assert steps == list(range(len(steps))) and len(steps) >= 5, run["system"]
    away, back = got["away"]
    assert sum(away < t < back for _, t in run["system"]) >= 3, (got["away"], run["system"])
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= run["metrics"]


@prelaunched(long=True)
def outages_around_a_search(shared, tmp_path):
    """A search whose server goes away twice, each time for at least 8 s, then returns on the same
    port and store: as the search starts (its parent run exists and has its UI view, its trial has
    no run yet) and as it ends (its trial's run finished, the driver at its end steps)."""
    server = MlflowServer(tmp_path / "mlflow").start()
    spec = yaml.safe_load((REPO / "search_spaces/quick.yaml").read_text())
    spec["name"] = "edges"
    spec["base"]["train"].update({"steps": 60, "log_every": 5})
    spec["base"]["eval"].update({"every": 30, "fid_samples": 32, "sampler_steps": 4})
    spec["search"] = {"curriculum.order": {"grid": ["easy-to-hard"]}}  # one trial: the outages are the test
    path = tmp_path / "edges.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs"
    proc = shared.start("tune", path, "--run-dir", run_dir, "--tracking-uri", server.uri, log=tmp_path / "tune.log",
                        env={"PACERAY_TRACKING_FLUSH_TIMEOUT": "300"}, tracking=False)

    def runs(kind: str):
        exp = server.client().get_experiment_by_name("edges")
        found = server.client().search_runs([exp.experiment_id]) if exp else []
        return [r for r in found if r.data.tags.get("paceray.kind") == kind]

    workers_log = run_dir / "searches/edges/workers.log"

    def outage(until=lambda: True) -> None:
        """The server away for at least 8 s, and until `until()` holds (the trial is seen waiting:
        on a loaded machine its actor can take longer than 8 s to start)."""
        server.stop()
        time.sleep(8)
        while not until():
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None, proc.output()[-3000:]
        server.start()

    def trial_waits() -> bool:
        return workers_log.is_file() and "is unreachable; waiting for it" in workers_log.read_text()

    try:
        deadline = time.monotonic() + 600
        # The first outage once the driver's own start-of-search writes are done (its UI view is
        # the last), before the trial has its run: the trial waits for it, then trains.
        while not ((parents := runs("search")) and VIEW_TAG in parents[0].data.tags):
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        trials_before = len(runs("trial"))
        outage(until=trial_waits)
        # ... and as the search ends: both trials' runs finished, the driver closing, reporting
        # and exporting (seconds of MLflow calls)
        while not ((children := runs("trial")) and all(c.info.status == "FINISHED" for c in children)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        outage()
        out = proc.finish(timeout=600)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    try:
        client = server.client()
        parent = runs("search")[0]
        children = runs("trial")
        steps = {c.data.params["curriculum.order"]: sorted(m.step for m in client.get_metric_history(c.info.run_id, "train/loss"))
                 for c in children}
    finally:
        server.stop()
    return {"returncode": proc.returncode, "out": out, "trials_before": trials_before, "parent": parent,
            "children": children, "steps": steps, "workers_log": workers_log.read_text()}


def test_outages_at_the_start_and_the_end_of_a_search_lose_nothing(outages_around_a_search):
    got = outages_around_a_search
    assert got["returncode"] == 0, got["out"][-4000:]
    assert got["trials_before"] == 0  # the first outage came before any trial had its run
    # the trials waited for their runs, then trained; every step logged once
    assert got["workers_log"].count("is unreachable; waiting for it") >= 1
    assert got["steps"] == {"easy-to-hard": list(range(5, 61, 5))}, got["steps"]
    assert [c.info.status for c in got["children"]] == ["FINISHED"]
    assert got["parent"].info.status == "FINISHED"
    # the end waited for the server, then closed, reported and exported
    assert "at the end of the search; waiting up to" in got["out"]
    art = Path(got["parent"].info.artifact_uri.removeprefix("file://"))
    assert (art / "report" / "report.html").is_file() and (art / "best" / "pipeline" / "model_index.json").is_file()
    assert "skipped" not in got["out"]


@prelaunched(long=True)
def killed_five_times_in_an_outage(shared, tmp_path):
    """A trial whose server goes away; while it is away (the whole time: many times the spool's
    2 s retry and MLflow's fast-fail budget of no retries) its training worker is SIGKILLed five
    times, each a seeded delay after a checkpoint newer than the last kill's was registered; then
    the server returns."""
    import random
    import re

    server = MlflowServer(tmp_path / "mlflow").start()
    # A checkpoint every 25 steps, 32 FID samples: each kill costs a worker restart and little more.
    base = tiny_base(train={"steps": 250, "log_every": 5, "checkpoint_keep": 2}, curriculum={"stage_steps": 50},
                     eval={"every": 25, "fid_samples": 32})
    spec = write_spec(tmp_path / "k.yaml", "kill5", base, resources={"workers": 1, "cpus_per_worker": 1, "max_failures": 6})
    run_dir = tmp_path / "runs"
    proc = _start_train(shared, spec, run_dir, server.uri, env={"PACERAY_SYSTEM_METRICS_INTERVAL": "1"})
    rng = random.Random(20261203)
    kills = []
    try:
        run_id = _wait_for_metrics(server, "kill5", proc)
        server.stop()
        deadline = time.monotonic() + 600
        while len(kills) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            pids = [int(p) for p in re.findall(r"\(RayTrainWorker pid=(\d+)\)", proc.output())]
            fresh = [p for p in pids if p not in {k[0] for k in kills}]
            step = registered_checkpoint_step(run_dir)
            if not fresh or step is None or (kills and step <= kills[-1][1]):
                time.sleep(0.2)
                continue
            time.sleep(rng.uniform(0.0, 1.5))  # the seeded point: somewhere between two checkpoints
            os.kill(fresh[-1], signal.SIGKILL)
            kills.append((fresh[-1], step))
        server.start()
        out = proc.finish(timeout=900)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    try:
        client = server.client()
        run = client.get_run(run_id)
        histories = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    finally:
        server.stop()
    return {"returncode": proc.returncode, "out": out, "kills": kills, "status": run.info.status,
            "histories": histories}


def test_five_kills_during_an_outage_log_every_step_exactly_once(killed_five_times_in_an_outage):
    got = killed_five_times_in_an_outage
    assert got["returncode"] == 0, got["out"][-4000:]
    assert len(got["kills"]) == 5 and len({pid for pid, _ in got["kills"]}) == 5
    # six training workers in turn: each kill restarted the group (a killed worker's last lines,
    # its "resumed from" among them, can die in its stdout buffer, so they are not counted)
    assert len(set(re.findall(r"\(RayTrainWorker pid=(\d+)\)", got["out"]))) >= 6
    assert "resumed from the checkpoint at step" in got["out"]
    assert got["status"] == "FINISHED"
    h = got["histories"]
    assert sorted(h["train/loss"]) == list(range(5, 251, 5)), h["train/loss"]
    assert sorted(h["eval/fid"]) == list(range(25, 251, 25))
    twice = {key: steps for key, steps in h.items() if len(steps) != len(set(steps))}
    assert not twice, twice  # no metric has a step twice, the restarted workers' system samples included
    system = sorted(h["system/cpu_utilization_percentage"])
    assert system == list(range(len(system)))


@prelaunched
def gone_for_good_trial(shared, tmp_path):
    """A trial whose server goes for good mid-run; afterwards a server on its store and
    `paceray replay-tracking` of the queue it left."""
    server = MlflowServer(tmp_path / "mlflow").start()
    # 200 steps (~10 s): the server must go while there is still training left to log.
    spec = write_spec(tmp_path / "g.yaml", "gone",
                      tiny_base(train={"steps": 200, "log_every": 5}, eval={"every": 100}))
    proc = _start_train(shared, spec, tmp_path / "runs", server.uri, flush_timeout=3)  # the server never returns
    try:
        run_id = _wait_for_metrics(server, "gone", proc)
        server.stop()
        out = proc.finish()
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    queue = tmp_path / "runs" / "mlflow-spool" / run_id
    left = (queue / "entries.jsonl").is_file()
    server.start()
    try:
        replay = shared.paceray("replay-tracking", queue, "--tracking-uri", server.uri, tracking=False)
    finally:
        server.stop()
    return {"returncode": proc.returncode, "out": out, "queue": queue, "left": left, "replay": replay.stdout,
            "run": _delivered(server, run_id)}


def test_mlflow_gone_for_good_leaves_the_queue_and_a_replay_command(gone_for_good_trial):
    got = gone_for_good_trial
    assert got["returncode"] == 0, got["out"][-4000:]
    assert got["left"]
    assert f"paceray replay-tracking {got['queue']}" in got["out"]
    assert "delivered" in got["replay"]
    assert got["run"]["status"] == "FINISHED"
    assert got["run"]["steps"]["train/loss"] == list(range(5, 201, 5))
    assert not got["queue"].exists()


def test_unreachable_tracking_server_at_start_is_one_line_before_training(tmp_path, storage):
    spec = write_spec(tmp_path / "u.yaml", "unreach", tiny_base())
    r = run_paceray("tune", spec, "--run-dir", tmp_path / "runs", "--tracking-uri", "http://127.0.0.1:1",
                    check=False, timeout=300)
    assert_one_line_error(r, "unreachable")
    assert not (tmp_path / "runs").exists()
