"""MLflow: where the store is, and the runs the platform owns (one per trial, nested under a search).

Tracking URI: `--tracking-uri` > `MLFLOW_TRACKING_URI` > the embedded default, a SQLite store and
artifact folder under the run directory. Many processes writing one SQLite file meet "database
is locked", so the embedded store is always served by one local `mlflow server` on loopback for
the length of the command, and every process (driver, Tune trials, Ray workers) talks HTTP to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from paceray.errors import PacerayError, one_line

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "paceray.trial_id"
KIND_TAG = "paceray.kind"  # "search" or "trial"


def embedded_store(run_dir: Path) -> tuple[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}", run_dir / "mlartifacts"


# No job runner: its eight huey consumers serve GenAI jobs we never submit, and cost seconds.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_argv(run_dir: Path, port: int, *options: str) -> list[str]:
    """`mlflow server` on 127.0.0.1 over the embedded store, run through `paceray.supervise`: the
    server leaves children behind after SIGTERM, the supervisor ends its whole process group
    when told to stop or when its parent dies, even by SIGKILL."""
    backend, artifacts = embedded_store(run_dir)
    # Artifacts as plain files under the run directory: every process of a local run shares that
    # disk, and `paceray report` / tests can read them without a server.
    return [sys.executable, "-m", "paceray.supervise", sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend,
            "--no-serve-artifacts", "--default-artifact-root", str(artifacts), *options]


def ui_command(run_dir: Path) -> str:
    return f"paceray ui --run-dir {run_dir}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One line before any training starts if an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # auth or Host-header check: the server is there
            return
        raise PacerayError(f"MLflow tracking server {uri} answered HTTP {e.code} on /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PacerayError(one_line(f"MLflow tracking server {uri} is unreachable ({reason}): start it, or drop "
                                    f"--tracking-uri / MLFLOW_TRACKING_URI to use the embedded store")) from None


class LocalServer:
    """`mlflow server` on 127.0.0.1 in front of the embedded SQLite store, run by `paceray.supervise`
    (see server_argv), which owns ending the server's whole process group."""

    def __init__(self, run_dir: Path, port: Optional[int] = None):
        self.run_dir = run_dir
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "LocalServer":
        backend, _ = embedded_store(self.run_dir)
        log = open(self.run_dir / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(server_argv(self.run_dir, self.port, "--workers", "2"), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.run_dir,
                                     env={**os.environ, **SERVER_ENV})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PacerayError(f"mlflow server for {backend} exited at start; see {self.run_dir / 'mlflow-server.log'}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise PacerayError(f"mlflow server for {backend} did not answer within {timeout:.0f}s; see "
                           f"{self.run_dir / 'mlflow-server.log'}")

    def stop(self) -> None:
        """Ask the supervisor to end the server: it stops the server's whole process group (after
        a grace period, by SIGKILL) and then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # last resort: the supervisor gives the server 10 s, then SIGKILL
            self.proc.kill()
            self.proc.wait(timeout=10)


def client_env(embedded: bool) -> dict[str, str]:
    """The MLflow client settings of every process of a command that talks to the tracking server
    itself (the driver, each Tune trial's process; the trainable's writes go through the spool).
    MLflow's default of 7 retries with exponential backoff per request would freeze a command
    for minutes on a server that went away. MLflow prints a "View run at http://…" link as each
    run ends; the embedded server's port dies with the command, so those links would be dead:
    the command prints `paceray ui …` instead. A user's own setting of any of these wins."""
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    if embedded:
        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return env


def apply_client_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)


def external_uri(tracking_uri: Optional[str]) -> Optional[str]:
    """The tracking server a command was pointed at (`--tracking-uri`, else MLFLOW_TRACKING_URI),
    or None for the embedded store."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


@contextmanager
def tracking_session(run_dir: Path, external: Optional[str]) -> Iterator[str]:
    """Yield the tracking URI every process of this command uses: `external` (from external_uri,
    checked reachable by the command before it wrote anything), else the embedded store, served
    meanwhile."""
    apply_client_env(client_env(embedded=external is None))
    if external:
        yield external
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    server = LocalServer(run_dir).start()
    try:
        yield server.uri
    finally:
        server.stop()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name)


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        c.log_batch(run_id, params=items[i:i + 100])


def find_run(uri: str, experiment: str, tags: Mapping[str, str]) -> Optional[str]:
    """The id of the run in `experiment` carrying all `tags` (latest first), if any."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def create_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
               params: Optional[Mapping[str, Any]] = None) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=dict(tags))
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


ERROR_TAG = "paceray.error"  # why a trial failed, set by the trainable or the platform


def trial_error(uri: str, run_id: str) -> Optional[str]:
    """The reason the trainable gave for failing its trial, if it did (None if the server is away)."""
    try:
        return client(uri).get_run(run_id).data.tags.get(ERROR_TAG)
    except Exception:
        return None


def finish_run(uri: str, run_id: str, status: str, run_dir: Path) -> Optional[str]:
    """End the run; if the server is away, queue the end behind the trial's spooled writes and
    return the command that replays them."""
    from paceray import runlog, spool

    folder = runlog.spool_dir(run_dir, run_id)
    if deliver_leftovers(uri, run_id, run_dir):
        try:
            end_run(uri, run_id, status)
            return None
        except Exception:
            pass
    spool.append(folder, {"kind": "terminate", "run_id": run_id, "status": status})
    return runlog.replay_command(folder, uri)


def record_failure(uri: str, run_id: str, error: BaseException) -> None:
    """Tag a trial's run with why it failed: the last line of the error (Ray wraps the worker's
    own error in its traceback text). If the server is away, the error itself is what matters."""
    text = str(error).strip()
    try:
        client(uri).set_tag(run_id, ERROR_TAG, text.splitlines()[-1][:4000] if text else repr(error))
    except Exception:
        pass


def end_trial_run(uri: str, run_id: str, status: str, run_dir: Path) -> None:
    """End a trial's run; say so if its last writes must wait on disk for the server."""
    left = finish_run(uri, run_id, status, run_dir)
    if left:
        print(f"warning: MLflow at {uri} is unreachable; run {run_id}'s last writes wait on disk: {left}",
              file=sys.stderr, flush=True)


def deliver_leftovers(uri: str, run_id: str, run_dir: Path) -> bool:
    """Deliver what a trial's process queued for its run and did not send before it died (a
    worker killed by a crash or by a scheduler's stop). True when nothing is left queued."""
    from paceray import runlog, spool

    folder = runlog.spool_dir(run_dir, run_id)
    return not folder.exists() or spool.drain(folder, spool.mlflow_deliverer(uri))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def serve_ui(run_dir: Optional[str], port: int) -> None:
    from paceray.paths import default_run_dir

    rd = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir()
    if not (rd / "mlflow.db").exists():
        raise PacerayError(f"{rd / 'mlflow.db'}: no embedded MLflow store here; pass --run-dir of a paceray run")
    print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)", flush=True)
    # The same server as the embedded one, supervised: on SIGTERM its whole group goes at once
    # (a bare `mlflow server` leaves its workers winding down for seconds).
    argv = server_argv(rd, port)
    os.execvpe(argv[0], argv, {**os.environ, **SERVER_ENV})
