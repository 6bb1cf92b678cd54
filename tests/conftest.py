"""Shared fixtures: one storage root per test session (datasets, FID nets, reference statistics
are made once), one CPU thread per test process (2 cores; oversubscription slows torch 10×)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACERAY = str(Path(sys.executable).parent / "paceray")
# Every process the tests start (commands, servers, `python -c` helpers) inherits one thread:
# with the prelaunched commands beside the unit tests, two torch threads per process on 2 cores
# slowed a FID-net training past its test's 300 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    """The session's storage root, exported for the `paceray` subprocesses the tests start."""
    root = tmp_path_factory.mktemp("storage")
    os.environ["PACERAY_STORAGE"] = str(root)
    return root


def run_paceray(*args, cwd=None, timeout=900, check=True, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([PACERAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
    if check:
        check_exit(r)
    return r


def check_exit(r: subprocess.CompletedProcess) -> None:
    """AssertionError with both outputs' tails if the `paceray` command `r` failed."""
    if r.returncode != 0:
        raise AssertionError(f"paceray {' '.join(map(str, r.args[1:]))} exited {r.returncode}\n"
                             f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}")


class Started(subprocess.Popen):
    """A `paceray` running in its own session, its stdout and stderr in a file (a pipe nobody
    reads while the test waits would fill and stall it)."""

    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 900) -> str:
        """Wait for it to end; its whole output."""
        self.wait(timeout=timeout)
        return self.output()


def start_paceray(*args, log: Path, env=None, base_env=None) -> Started:
    """`paceray ARGS` in the background, in the environment `base_env` (default: os.environ now)."""
    merged = {**(os.environ if base_env is None else base_env), "RAY_AUTH_MODE": "disabled", **(env or {})}
    proc = Started([PACERAY, *map(str, args)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                   start_new_session=True, env={k: v for k, v in merged.items() if v is not None})  # None: unset
    proc.log = log
    return proc


def write_spec(path: Path, name: str, base: dict, search: dict | None = None, resources: dict | None = None,
               tune: dict | None = None, arms: list | None = None) -> Path:
    import yaml

    spec = {"name": name, "trainable": "denoiser", "base": base, "search": search or {},
            "resources": resources or {"workers": 1, "cpus_per_worker": 1}, "tune": tune or {}}
    if arms is not None:
        spec["arms"] = arms
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_base(**sections) -> dict:
    """A digits trial small enough for CPU tests; sections override the defaults given here."""
    base = {
        "data": {"dataset": "digits", "image_size": 8},
        "model": {"preset": "tiny"},
        "diffusion": {"timesteps": 1000, "schedule": "linear"},
        "curriculum": {"order": "easy-to-hard", "num_clusters": 4, "pacing": "fixed", "stage_steps": 10},
        "train": {"steps": 40, "batch_size": 32, "lr": 0.002, "log_every": 5},
        "eval": {"every": 20, "fid_samples": 64, "sampler_steps": 5, "batch_size": 64, "sample_grid": 16},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return base


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def experiment_runs(where, experiment: str):
    """(client, every run of `experiment`) in the embedded store of the run directory `where`, or
    in the shared MLflow server's store when `where` is the SharedCluster."""
    client = where.client() if isinstance(where, SharedCluster) else mlflow_client(where)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of the trials under `run_dir`, oldest step first."""
    return sorted((run_dir / "ray").glob("*/checkpoint_step*"))


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint_step")[:8])  # past a fallback: "…-resumed"


def registered_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train registered for a `paceray train` run (what a
    restart resumes from), or None. A checkpoint folder on disk is not enough: the controller
    registers it a moment after the worker wrote it, later still on a loaded machine."""
    from paceray.base.errors import PacerayError
    from paceray.trial.trainer import latest_checkpoint

    steps = []
    for trial_dir in (run_dir / "ray").glob("*"):
        try:
            ckpt = latest_checkpoint(trial_dir)
        except PacerayError:  # Ray's snapshot caught mid-write (it rewrites it in place): not yet
            continue
        if ckpt is not None:
            steps.append(checkpoint_step(ckpt))
    return max(steps) if steps else None


def kill_session(leader: int, timeout: float = 60) -> None:
    """SIGKILL every process of the session `leader` started (a Popen with start_new_session=True),
    and wait until none is left. Killing its process group is not enough: Ray gives each worker
    a process group of its own, and a worker outlives its driver by seconds, long enough to train
    on and register another checkpoint."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getsid(p.pid) == leader and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes of session {leader} survive SIGKILL: {alive}"
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.1)


@pytest.fixture
def fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST folder. Without it the test is skipped on a developer's
    machine (nothing downloads here), but fails where it must run: `.ci/run` installs the package
    and sets PACERAY_REQUIRE_FASHION_MNIST, so CI never passes by skipping."""
    from trainables.diffusion.datasets_sources import FASHION_MNIST_DIR

    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    message = f"{FASHION_MNIST_DIR} holds no Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    if os.environ.get("PACERAY_REQUIRE_FASHION_MNIST"):
        pytest.fail(message)
    pytest.skip(message)


def postgres_missing(message: str = "") -> None:
    """Skip a PostgreSQL test where Debian's postgresql is not installed; fail it where it must
    run (`.ci/run` installs the package and sets PACERAY_REQUIRE_POSTGRES)."""
    from postgres import REQUIRE_ENV

    message = message or "no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_mlflow(tmp_path_factory):
    """A PostgreSQL server of the tests' own and an `mlflow server` on it (tests/postgres.py),
    shared by the tests that track into it; both stopped at the session's end."""
    from postgres import Postgres, PostgresMlflowServer, postgres_bin

    if postgres_bin() is None:
        postgres_missing()
    pg = Postgres().start()
    try:
        server = PostgresMlflowServer(pg, tmp_path_factory.mktemp("pg-mlflow"), "mlflow").start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        pg.stop()


def wait_for_checkpoint(run_dir: Path, proc: Started, timeout: float = 600) -> int:
    """The step of the first checkpoint Ray Train registers for the `paceray train` in `run_dir`."""
    deadline = time.monotonic() + timeout
    while (step := registered_checkpoint_step(run_dir)) is None:
        assert proc.poll() is None, proc.output()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.2)
    return step



# ----------------------------------------------------------------- one Ray cluster and one MLflow server
# Most end-to-end tests only need *a* Ray cluster and *an* MLflow server: starting both costs each
# `paceray` command ~15-20 s. They share one of each, isolated by experiment name and run
# directory. Tests that crash Ray on purpose, or start their own head, keep their own local Ray;
# two Ray instances on one host break Train's placement-group cleaner, so the shared cluster runs
# first (the items using it are ordered first) and is stopped before any other Ray test runs.


class SharedCluster:
    """A real `ray start --head` (its own session, token authentication on, the dashboard on
    loopback) and a real `mlflow server` (SQLite) for the tests that can share them."""

    instance: "SharedCluster | None" = None
    stores_left: list[Path] = []  # the stopped clusters' folders, holding only their MLflow store

    def __init__(self):
        import secrets

        from paceray.tracking.server import LocalServer, free_port

        self.temp = Path(tempfile.mkdtemp(prefix="rsh", dir="/tmp"))  # Ray's socket paths stay short
        # The environment of the commands run against it, as it is now: a prelaunched command
        # must not inherit what a unit test running meanwhile monkeypatched.
        self.base_env = dict(os.environ)
        self._live: set[subprocess.Popen] = set()  # commands still running (paceray())
        self._live_lock = threading.Lock()
        self.gcs = free_port()
        # No node of this cluster is ever preempted: Train's preemption watcher (one more process
        # per trial, on by default on clusters) is off for the commands run against it.
        # Nor does any test read Train's Prometheus metrics (two more callbacks per trial).
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_ADDRESS": f"127.0.0.1:{self.gcs}", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                    "RAY_TRAIN_METRICS_ENABLED": "0"}
        ray_bin = str(Path(sys.executable).parent / "ray")
        dashboard = free_port()
        self.jobs_address = f"http://127.0.0.1:{dashboard}"  # the Jobs API of `ray job submit`
        # The workers import what the driver does: the test trainable lives in tests/.
        # A job's entrypoint (`ray job submit -- paceray …`) runs on the head, on the head's PATH.
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS")
        self.head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             # Not Ray's fixed default (52365): another Ray on the machine (a search of one's own)
             # holds it, and then this head's agent never registers: no `ray job submit`, no State
             # API for Ray Train's PlacementGroupCleaner (both seen in a suite run beside a search).
             "--dashboard-agent-listen-port", str(free_port()),
             "--num-cpus", "2", "--temp-dir", str(self.temp)],
            stdout=open(self.temp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        root = self.temp / "mlflow"
        root.mkdir()
        self.mlflow = LocalServer(root).start()
        self.uri = self.mlflow.uri
        self._wait_for_head(ray_bin, env)

    def _wait_for_head(self, ray_bin: str, env: dict, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run([ray_bin, "status", "--address", self.env["RAY_ADDRESS"]], capture_output=True,
                               text=True, env={**env, **self.env})
            if r.returncode == 0 and "2.0 CPU" in r.stdout:
                return
            assert self.head.poll() is None, (self.temp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, r.stdout[-2000:] + r.stderr[-2000:]
            time.sleep(1)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.mlflow.run_dir / 'mlflow.db'}")

    def _extra(self, command: str, tracking: bool) -> list[str]:
        ray = ["--address", self.env["RAY_ADDRESS"]] if command in ("train", "tune") else []
        store = ["--tracking-uri", self.uri] if tracking and command in ("train", "tune", "report") else []
        return ray + store

    def paceray(self, command: str, *args, env=None, tracking: bool = True, check: bool = True, timeout: float = 900,
                cwd=None) -> subprocess.CompletedProcess:
        """`paceray COMMAND ARGS` against the shared cluster (train, tune) and, unless `tracking` is
        False (the test brings its own server), the shared store (train, tune, report). In a
        session of its own, its output in files: safe from a prelaunch thread, and stop() kills
        whatever of it is still running."""
        argv = [PACERAY, command, *map(str, args), *self._extra(command, tracking)]
        folder = Path(tempfile.mkdtemp(prefix="cmd", dir=self.temp))
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, start_new_session=True,
                                    env={**self.base_env, "RAY_AUTH_MODE": "disabled", **self.env, **(env or {})})
        with self._live_lock:
            self._live.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait()
        finally:
            with self._live_lock:
                self._live.discard(proc)
        r = subprocess.CompletedProcess(argv, proc.returncode, (folder / "stdout").read_text(errors="replace"),
                                        (folder / "stderr").read_text(errors="replace"))
        if check:
            check_exit(r)
        return r

    def start(self, command: str, *args, log: Path, env=None, tracking: bool = True) -> "Started":
        """The same, in the background (see start_paceray)."""
        proc = start_paceray(command, *args, *self._extra(command, tracking), log=log,
                             env={**self.env, **(env or {})}, base_env=self.base_env)
        with self._live_lock:
            self._live.add(proc)  # killed at stop() if its test never ended it
        return proc

    def ray_state(self, what: str, *filters: str) -> list[dict]:
        """`ray list WHAT --filter F …` on this cluster, as JSON (Ray's state API)."""
        import json

        argv = [str(Path(sys.executable).parent / "ray"), "list", what, "--address", self.jobs_address,
                "--format", "json", "--limit", "10000"]
        for f in filters:
            argv += ["--filter", f]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**self.base_env, **self.env})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        if r.stdout.strip() == "No resource in the cluster":  # what it prints for an empty list
            return []
        return json.loads(r.stdout)

    def wait_until_job_gone(self, driver_pid: int, timeout: float = 180) -> None:
        """After the driver with `driver_pid` was killed: until no actor of its job is alive. Ray
        ends them once it sees the driver gone, but a trial's worker outlives its driver by
        seconds, long enough to train on and register another checkpoint."""
        jobs = [j["job_id"] for j in self.ray_state("jobs") if (j.get("driver_info") or {}).get("pid") == str(driver_pid)]
        assert len(jobs) == 1, jobs
        deadline = time.monotonic() + timeout
        # Ray's cluster-wide singleton, made by the first job that needs it, lives on by design.
        singletons = {"_AutoscalingCoordinatorActor"}
        while alive := [a for a in self.ray_state("actors", f"job_id={jobs[0]}", "state=ALIVE")
                        if a.get("class_name") not in singletons]:
            assert time.monotonic() < deadline, [(a.get("class_name"), a.get("pid")) for a in alive]
            time.sleep(1)

    def stop(self) -> None:
        import shutil

        with self._live_lock:
            live = list(self._live)
        for proc in live:  # a prelaunched command its test never waited for (a failure before it)
            kill_session(proc.pid)
        self.mlflow.stop()
        # A throwaway cluster: every process of the head's session at once (Ray's workers sit in
        # process groups of their own, so a group signal would miss them).
        kill_session(self.head.pid)
        self.head.wait(timeout=30)
        # The store stays readable (client() reads its SQLite file) until the session ends: an
        # own-Ray test, which runs after this stop, may compare with a shared trial's metrics.
        for child in self.temp.iterdir():
            if child.name != "mlflow":
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        SharedCluster.stores_left.append(self.temp)

    @classmethod
    def get(cls) -> "SharedCluster":
        if cls.instance is None:
            cls.instance = cls()
        return cls.instance

    @classmethod
    def shut(cls) -> None:
        if cls.instance is not None:
            cls.instance.stop()
            cls.instance = None


@pytest.fixture(scope="session")
def shared(storage) -> SharedCluster:
    """The shared Ray cluster and MLflow server (started on first use; the tests using it run first)."""
    return SharedCluster.get()


# ----------------------------------------------------------------- prelaunched commands
# One command alone leaves a core idle most of the time: its processes start one after another
# (driver, Train controller, worker), each importing torch and Ray in a single thread. The
# shared cluster's commands whose tests only read what they left are started together when the
# session starts, PRELAUNCH_AT_ONCE at a time, while the unit tests run; their tests come after
# those and wait for whatever is still running. A test that drives a command step by step (kill a
# worker, stop its MLflow server) is a launcher too: the steps run in the launcher, which returns
# what they left, and the test asserts on that.

# Two at once, beside the main thread's unit tests. Three were tried (stop 19): the suite took
# longer (30 min vs 27) and the unit tests' own subprocesses ran into their timeouts; the suite is
# CPU-bound, so more at once only adds contention.
PRELAUNCH_AT_ONCE = 2


class Prelaunch:
    launchers: dict[str, Callable] = {}  # name -> launcher(shared, folder), registered by @prelaunched
    long: set[str] = set()  # the launchers started before the others (the longest: fewer idle slots at the end)
    instance: "Prelaunch | None" = None

    def __init__(self, names: list[str], tmp_path_factory):
        shared = SharedCluster.get()
        self.pool = ThreadPoolExecutor(PRELAUNCH_AT_ONCE, thread_name_prefix="prelaunch")
        self.spans: dict[str, tuple[float, float]] = {}  # name -> (start, end), monotonic, for the summary
        self.futures: dict[str, Future] = {
            name: self.pool.submit(self._timed, name, shared, tmp_path_factory.mktemp(name))
            for name in sorted(names, key=lambda n: n not in self.long)}

    def _timed(self, name: str, shared, folder):
        start = time.monotonic()
        try:
            return self.launchers[name](shared, folder)
        finally:
            self.spans[name] = (start, time.monotonic())

    def result(self, name: str):
        return self.futures[name].result()

    @classmethod
    def cancel(cls) -> None:
        """Start nothing more (what runs is killed with the cluster)."""
        if cls.instance is not None:
            cls.instance.pool.shutdown(wait=False, cancel_futures=True)


def prelaunched(launcher: Callable | None = None, *, long: bool = False):
    """`@prelaunched` on `def name(shared, folder)`: that command (or that sequence of steps: start
    it, kill it, stop its server...), started when the session starts (see above); the session
    fixture `name` is what it returned (or raises what it raised). `@prelaunched(long=True)`:
    one of the longest, started first."""
    if launcher is None:
        return lambda f: prelaunched(f, long=long)
    name = launcher.__name__
    Prelaunch.launchers[name] = launcher
    if long:
        Prelaunch.long.add(name)

    @pytest.fixture(scope="session", name=name)
    def fixture(prelaunch):
        return prelaunch.result(name)

    return fixture


def _prelaunched_names(item) -> list[str]:
    return [n for n in getattr(item, "fixturenames", ()) if n in Prelaunch.launchers]


@pytest.fixture(scope="session", autouse=True)
def prelaunch(request, tmp_path_factory) -> "Prelaunch | None":
    names = list(dict.fromkeys(n for item in request.session.items for n in _prelaunched_names(item)))
    if names and Prelaunch.instance is None:
        request.getfixturevalue("storage")  # exported before any command starts
        Prelaunch.instance = Prelaunch(names, tmp_path_factory)
    return Prelaunch.instance


def _order(item) -> int:
    if item.get_closest_marker("own_ray") is not None:
        return 3  # last, the shared cluster stopped: never two Ray instances at once
    if _prelaunched_names(item):
        return 2  # by then their commands have had the longest to run
    # the shared cluster's step-by-step tests first, then the unit tests
    return 0 if "shared" in getattr(item, "fixturenames", ()) else 1


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_order)  # stable: the order within each kind stays as collected


def pytest_runtest_setup(item):
    if item.get_closest_marker("own_ray") is not None:
        # An own-Ray test may compare with a prelaunched command's result: that one ends first.
        for name in _prelaunched_names(item):
            if Prelaunch.instance is not None:
                Prelaunch.instance.futures[name].exception()  # waits; its fixture re-raises what it raised
        shut_shared()  # this test starts a Ray of its own: never two at once


def shut_shared() -> None:
    Prelaunch.cancel()
    SharedCluster.shut()


def pytest_terminal_summary(terminalreporter):
    """How long each prelaunched command ran, and when it ended: the suite's critical path is
    these two slots once the unit tests are done (their tests' `setup` time is only the wait)."""
    instance = Prelaunch.instance
    if instance is None or not instance.spans:
        return
    first = min(start for start, _ in instance.spans.values())
    terminalreporter.write_sep("=", "prelaunched commands (wall s, ended at s)")
    for name, (start, end) in sorted(instance.spans.items(), key=lambda kv: kv[1][0] - kv[1][1]):
        terminalreporter.write_line(f"{end - start:8.1f}  {end - first:8.1f}  {name}")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shut_shared()
    for folder in SharedCluster.stores_left:
        shutil.rmtree(folder, ignore_errors=True)
