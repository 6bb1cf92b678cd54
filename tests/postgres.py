"""The database users deploy, in the tests: a PostgreSQL server of the tests' own and an `mlflow
server` on it as `k8s/` runs one (PostgreSQL backend store, `--serve-artifacts`, the basic-auth
app with an admin from the environment).

PostgreSQL comes from Debian's `postgresql` package (`initdb` and `pg_ctl` under
/usr/lib/postgresql/*/bin). Both refuse to run as root, and CI runs as root: then they run as an
unprivileged user (`postgres` where the package made one, else `nobody`) in a temp dir of
their own under /tmp (pytest's own temp root is 0700 root's). It listens on 127.0.0.1 only, on a
port of its own, and is stopped by its own `pg_ctl`. Without PostgreSQL the tests that need it
skip, unless PACERAY_REQUIRE_POSTGRES is set (`.ci/run` sets it): then they fail.
"""

from __future__ import annotations

import configparser
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from paceray.tracking.server import SERVER_ENV, free_port

REQUIRE_ENV = "PACERAY_REQUIRE_POSTGRES"
K8S_AUTH_INI = Path(__file__).resolve().parent.parent / "k8s" / "base" / "basic_auth.ini"
ADMIN = "admin"


def postgres_bin() -> Optional[Path]:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


class Postgres:
    """One PostgreSQL cluster in a temp dir, a password user `paceray`, loopback only."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="paceray-pg-"))
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.user = ("postgres" if _user_exists("postgres") else "nobody") if os.geteuid() == 0 else None

    def start(self) -> "Postgres":
        (self.root / "pw").write_text(self.password + "\n")
        if self.user:
            account = pwd.getpwnam(self.user)
            for path in (self.root, self.root / "pw"):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._as_owner("initdb", "-D", str(self.root / "data"), "-U", "paceray", f"--pwfile={self.root / 'pw'}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        self._as_owner("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "postgres.log"),
                       "-o", options, "-w", "-t", "120", "start")
        return self

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URI (psycopg2, password in the URI: loopback, test-only)."""
        self._as_owner("createdb", "-h", str(self.root), "-p", str(self.port), "-U", "paceray", name)
        return f"postgresql+psycopg2://paceray:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._as_owner("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _as_owner(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}\n"
                               f"{self.log()}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class PostgresMlflowServer:
    """`mlflow server` on a database of `postgres`, as k8s/base/mlflow.yaml runs it: artifacts
    served by the server into a folder, the basic-auth app (its users in a SQLite file beside,
    as there), an admin whose credentials `client_env` gives. Stopped and started again on the
    same port, database and folder, like `tests/test_reliability.py`'s SQLite server."""

    def __init__(self, postgres: Postgres, root: Path, database: str, auth_cache_ttl: Optional[int] = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, free_port()
        self.backend = postgres.create_database(database)
        self.artifacts = root / "artifacts"
        self.password = secrets.token_hex(12)
        # k8s/'s basic_auth.ini, its users' database moved here; `auth_cache_ttl` other than None
        # replaces its credential cache (0 turns it off: benchmarks/tracking_load.py compares).
        auth = configparser.ConfigParser()
        auth.read(K8S_AUTH_INI)
        auth["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
        if auth_cache_ttl is not None:
            auth["mlflow"]["auth_cache_ttl_seconds"] = str(auth_cache_ttl)
        with open(root / "basic_auth.ini", "w") as f:
            auth.write(f)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client needs to write here: the admin's credentials."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.password}

    def start(self, timeout: float = 180.0) -> "PostgresMlflowServer":
        argv = [sys.executable, "-m", "paceray.base.supervise", sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", self.backend, "--serve-artifacts",
                "--artifacts-destination", str(self.artifacts), "--app-name", "basic-auth"]
        env = {**os.environ, **SERVER_ENV, "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN, "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret"}
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server on PostgreSQL did not start:\n{self.server_log()}")
                time.sleep(0.3)

    def stop(self) -> None:
        """The supervisor ends the server's whole process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def server_log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]

    def client(self):
        """A client of the database itself: it reads what was delivered while the server is down."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.backend)

    def artifact_dir(self, run) -> Path:
        """Where a run's artifacts lie (`mlflow-artifacts:/EXP/RUN/artifacts` under the folder)."""
        return self.artifacts / run.info.artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
