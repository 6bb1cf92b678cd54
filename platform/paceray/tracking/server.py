"""The MLflow server of a command: the embedded store (a SQLite file and an artifact folder under
the run directory) served by one local `mlflow server` on loopback, or a server the user named.

Many processes writing one SQLite file meet "database is locked", so the embedded store is always
served by one local `mlflow server` for the length of the command, and every process (driver,
Tune trials, Ray workers) talks HTTP to it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

from paceray.base.errors import PacerayError, one_line
from paceray.base.paths import RunDir


def embedded_store(run_dir: Path) -> tuple[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunDir(run_dir).store_uri, RunDir(run_dir).artifacts


# No job runner: its eight huey consumers serve GenAI jobs we never submit, and cost seconds.
# A pool a request thread can always finish in: MLflow 3.17's log_batch holds a database
# connection (its run lookup) while its metric and param writes each check out another. With
# SQLAlchemy's default pool (5 + 10 overflow), 15 concurrent log_batch calls each hold one and
# wait for a second: every request stalls until the pool's 30 s timeout. The server runs
# requests on at most 40 threads (anyio's default), so 41 connections per worker process always
# leave one free; idle ones above the 5 kept are closed.
POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "36"}
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **POOL_ENV}


def server_argv(run_dir: Path, port: int, *options: str, host: str = "127.0.0.1") -> list[str]:
    """`mlflow server` on `host` (loopback by default) over the embedded store, run through
    `paceray.supervise`: the server leaves children behind after SIGTERM, the supervisor ends its
    whole process group when told to stop or when its parent dies, even by SIGKILL."""
    backend, artifacts = embedded_store(run_dir)
    # Artifacts as plain files under the run directory: every process of a local run shares that
    # disk, and `paceray report` / tests can read them without a server.
    return [sys.executable, "-m", "paceray.base.supervise", sys.executable, "-m", "mlflow", "server",
            "--host", host, "--port", str(port), "--backend-store-uri", backend,
            "--no-serve-artifacts", "--default-artifact-root", str(artifacts), *options]


UI_PORT = 5000  # `paceray ui`'s default


def ui_command(run_dir: Path, experiment: Optional[str] = None) -> str:
    return f"paceray ui --run-dir {run_dir}" + (f" {experiment}" if experiment else "")


def ui_base(port: int = UI_PORT) -> str:
    return f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether the tracking server answers at all right now (any HTTP status counts; a store
    that is not a server always does): one cheap probe before a command's own MLflow calls,
    each of which would otherwise wait out MLflow's retries on a server that went away."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


# What MLflow's tracking client accepts (and a plain path); anything else (`localhost:5000`) would
# reach MLflow's store registry and end in its traceback.
STORE_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_scheme(uri: str) -> None:
    import urllib.parse

    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2://
    if scheme and scheme not in STORE_SCHEMES:  # no scheme: a local path, MLflow's file store
        raise PacerayError(f"tracking URI {uri!r}: expected http(s)://HOST:PORT of an MLflow server or a store URI "
                           f"({', '.join(s + '://' for s in STORE_SCHEMES)}), not scheme {scheme!r}")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One line before any training starts if the URI names no MLflow store or an HTTP tracking
    server does not answer."""
    check_scheme(uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # 401/403: auth or Host-header check, the server is there
            raise PacerayError(f"MLflow tracking server {uri} answered HTTP {e.code} on /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PacerayError(one_line(f"MLflow tracking server {uri} is unreachable ({reason}): start it, or drop "
                                    f"--tracking-uri / MLFLOW_TRACKING_URI to use the embedded store")) from None
    check_credentials(uri)


# How MLflow's client reports a refused request: its REST error codes, or (a non-JSON body, as
# the basic-auth app's 401 has) the status in its message.
_REFUSED = re.compile(r"\b(UNAUTHENTICATED|PERMISSION_DENIED)\b|error code (401|403)\b")


def check_credentials(uri: str) -> None:
    """One read with the credentials MLflow's client will use (MLFLOW_TRACKING_USERNAME /
    _PASSWORD / _TOKEN): a server with authentication answers /health to anyone, so wrong or
    missing credentials would otherwise surface as a traceback at the first write."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as e:
        if not _REFUSED.search(f"{e.error_code} {e}"):
            raise
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        as_whom = f"as user {who!r}" if who else "without credentials"
        raise PacerayError(one_line(
            f"MLflow tracking server {uri} refused a request {as_whom} ({str(e).splitlines()[0][:160]}): set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account that "
            f"may edit experiments")) from None


class LocalServer:
    """`mlflow server` on 127.0.0.1 in front of the embedded SQLite store, run by `paceray.supervise`
    (see server_argv), which owns ending the server's whole process group."""

    def __init__(self, run_dir: Path, port: Optional[int] = None, host: str = "127.0.0.1"):
        self.run_dir = run_dir
        self.host = host  # another address only where other machines must reach it, behind auth
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 180.0) -> "LocalServer":
        backend, _ = embedded_store(self.run_dir)
        log = open(RunDir(self.run_dir).server_log, "ab")
        # One worker: uvicorn then serves in the `mlflow server` process's own child, with no
        # supervisor process and no second copy of MLflow's app to import (a start took 22 CPU-s
        # with 2 workers, 14 with 1); requests still run concurrently in its thread pool, and one
        # process is all that ever writes the SQLite file.
        self.proc = subprocess.Popen(server_argv(self.run_dir, self.port, "--workers", "1", host=self.host), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.run_dir,
                                     env={**os.environ, **SERVER_ENV})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PacerayError(f"mlflow server for {backend} exited at start; see {RunDir(self.run_dir).server_log}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise PacerayError(f"mlflow server for {backend} did not answer within {timeout:.0f}s; see "
                           f"{RunDir(self.run_dir).server_log}")

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


def serve_ui(run_dir: Optional[str], port: int, experiment: Optional[str] = None) -> None:
    from paceray.base.paths import default_run_dir

    rd = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir()
    if not RunDir(rd).store_db.exists():
        raise PacerayError(f"{RunDir(rd).store_db}: no embedded MLflow store here; pass --run-dir of a paceray run")
    landing = _landing(rd, ui_base(port), experiment)
    print(f"MLflow UI on {ui_base(port)} (Ctrl-C to stop)", flush=True)
    if landing:
        print(landing, flush=True)
    # The same server as the embedded one, supervised: on SIGTERM its whole group goes at once
    # (a bare `mlflow server` leaves its workers winding down for seconds). One worker, as the
    # embedded one (LocalServer.start): a browser's requests run in its thread pool, a start costs
    # a third of MLflow's default four, and one process writes the SQLite file.
    argv = server_argv(rd, port, "--workers", "1")
    os.execvpe(argv[0], argv, {**os.environ, **SERVER_ENV})


def _landing(run_dir: Path, base: str, experiment: Optional[str]) -> Optional[str]:
    """The line naming the URL of the newest search's comparison (in `experiment`, or in any),
    read from the store before it is served; an unknown experiment is a one-line error."""
    import logging

    from mlflow.tracking import MlflowClient

    from paceray.tracking import ui_view

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Updating database tables" on open
    client = MlflowClient(tracking_uri=embedded_store(run_dir)[0])
    if experiment and client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments())
        raise PacerayError(f"{RunDir(run_dir).store_db}: no experiment {experiment!r} (there: {', '.join(names) or 'none'})")
    run = ui_view.latest_search(client, experiment)
    if run is None:
        return None
    url = ui_view.comparison_url(base, run.info.experiment_id, run.data.tags.get(ui_view.VIEW_TAG))
    return f"the trials of {run.info.run_name or run.info.run_id} compared: {url}"
